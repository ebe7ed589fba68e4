"""Model definitions and the one preprocessing definition.

Kept import-light on purpose: the TorchServe archive ships this package with
only ``presets`` and ``optimize`` in it, so nothing here may import the architectures.
Build models with ``models.zoo.get_model``.
"""
