"""Every model of the project, built by name: ``get_model("resnet50", num_classes=133)``.

Importing this module registers the builders (models/architectures.py) and, for every
other name, torchvision's classification models (models/torchvision_models.py); both use
the mechanism of models/registry.py, which itself imports none of them, as timm's
``_registry.py`` never imports the models it registers.
"""

from models import (
    architectures,  # noqa: F401 - registers the builders
    torchvision_models,  # noqa: F401 - answers for torchvision's other names
)
from models.registry import ModelSpec, get_model, get_spec, known_models, list_models

__all__ = ["ModelSpec", "get_model", "get_spec", "known_models", "list_models"]
