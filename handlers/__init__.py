"""TorchServe handlers. Each module is archived on its own, with the models package beside it."""
