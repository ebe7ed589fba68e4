"""Export: a checkpoint to the TorchScript file, labels and model-config.yaml an archive carries
(``python -m training.export``)."""
