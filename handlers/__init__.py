"""The runtime: everything a TorchServe worker runs of this project, shipped whole in
every archive (serving/archive.py). The handlers (``image_classifier``, ``dog_breeds``),
decoding (``decode``), the eval preset that training shares (``preset``), the worker's
optimisation (``optimize``) and the served settings (``settings``). It imports nothing
else of this project, so a .mar needs nothing beside it.
"""
