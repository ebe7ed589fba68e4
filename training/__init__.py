"""Training, evaluation and export: dataset folder -> checkpoint -> TorchScript."""
