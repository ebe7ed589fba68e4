"""Model definitions: every network by name (``models.zoo.get_model``), their pretrained
weights and training's augmentation. Training and export use this package; a served
model never does (the archive carries the TorchScript file and the ``handlers`` runtime).
"""
