"""The registration mechanism of models built by name.

Builders register themselves with ``@register_model``; an unknown name is an error
that lists the known ones. This module imports no builder: models/zoo.py imports them
all, and is what callers import (``from models.zoo import get_model``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from models.presets import EvalPreset, TrainPreset


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    train_preset: TrainPreset
    pretrained: bool  # whether ImageNet weights exist for it (torchvision's, or installed with a package)
    head: str  # the classifier module: trained first in staged fine-tuning
    # Serving (optimize: onednn): the batch sizes to compile a model copy for, when the
    # export does not say; None: 1, 2, 4, ... up to batchSize (models/optimize.py).
    onednn_batches: tuple[int, ...] | None = None
    # The eval transform its pretrained weights expect, when not ImageNet's (EvalPreset()).
    eval_preset: EvalPreset | None = None

    def eval_preset_for(self, pretrained: bool) -> EvalPreset:
        """The eval transform to train and serve with: the weights' own when pretrained
        weights are loaded, else the project's default."""
        return self.eval_preset if pretrained and self.eval_preset else EvalPreset()


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, train_preset: TrainPreset = TrainPreset(), pretrained: bool = True,
                   head: str = "classifier", onednn_batches: tuple[int, ...] | None = None,
                   eval_preset: EvalPreset | None = None):
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, fn, train_preset, pretrained, head, onednn_batches, eval_preset)
        return fn
    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None


def get_model(name: str, num_classes: int, **options) -> nn.Module:
    """Build model ``name`` with a head of ``num_classes`` outputs.

    Options are the builder's keywords (weights, weights_file, unfreeze_layer3, ...).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return get_spec(name).build(num_classes=num_classes, **options)

