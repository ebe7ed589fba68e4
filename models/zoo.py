"""Every model of the project, built by name: ``get_model("resnet50", num_classes=133)``.

Importing this module registers the builders (models/architectures.py), which use the
mechanism of models/registry.py; the registry itself imports none of them, as timm's
``_registry.py`` never imports the models it registers.
"""
from models import architectures  # noqa: F401 - registers the builders
from models.registry import ModelSpec, get_model, get_spec, list_models

__all__ = ["ModelSpec", "get_model", "get_spec", "list_models"]
