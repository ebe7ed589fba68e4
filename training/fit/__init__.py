"""Training: a registered model fitted to an image folder, from its recipe, to a self-describing
checkpoint."""
