"""``python -m training.export``: the TorchScript export (training/export/torchscript.py)."""

from training.export.torchscript import main

main()
