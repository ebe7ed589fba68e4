"""The registration mechanism of models built by name.

Builders register themselves with ``@register_model``; a name no builder registered
goes to the fallback resolvers (``register_fallback``: models/torchvision_models.py
answers for torchvision's classification models), and a name nobody knows is an error
that lists the known ones. This module imports no builder: models/zoo.py imports them
all, and is what callers import (``from models.zoo import get_model``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from handlers.preset import EvalPreset
from models.augment import TrainPreset


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    train_preset: TrainPreset
    pretrained: bool  # whether ImageNet weights exist for it (torchvision's, or installed with a package)
    # The classifier module's attribute, trained first in staged fine-tuning; None: found
    # on the built model by ``find_head`` (a model family's attribute, known once built).
    head: str | None
    # Serving (optimize: onednn): the batch sizes to compile a model copy for, when the
    # export does not say; None: 1, 2, 4, ... up to batchSize (handlers/optimize.py).
    onednn_batches: tuple[int, ...] | None = None
    # The eval transform its pretrained weights expect, when not ImageNet's (EvalPreset()).
    eval_preset: EvalPreset | None = None
    # Models with several sets of weights: the eval transform of weights by name.
    weights_preset: Callable[[str], EvalPreset] | None = None
    find_head: Callable[[nn.Module], str] | None = None

    def head_of(self, model: nn.Module) -> str:
        """The attribute of ``model``'s classifier head."""
        return self.head if self.head is not None else self.find_head(model)

    def eval_preset_for(self, pretrained: bool, weights: str | None = None) -> EvalPreset:
        """The eval transform to train and serve with: the weights' own when pretrained
        weights are loaded (``weights`` names them where the model has several), else
        the project's default."""
        if pretrained and weights and self.weights_preset:
            return self.weights_preset(weights)
        return self.eval_preset if pretrained and self.eval_preset else EvalPreset()


_REGISTRY: dict[str, ModelSpec] = {}
# (resolve, description): resolve(name) gives a ModelSpec or None; the description
# stands for its names in the unknown-model error ("any torchvision classification model, e.g. ...").
_FALLBACKS: list[tuple[Callable[[str], ModelSpec | None], str]] = []


def register_model(
    name: str,
    *,
    train_preset: TrainPreset = TrainPreset(),
    pretrained: bool = True,
    head: str = "classifier",
    onednn_batches: tuple[int, ...] | None = None,
    eval_preset: EvalPreset | None = None,
):
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, fn, train_preset, pretrained, head, onednn_batches, eval_preset)
        return fn

    return wrap


def register_fallback(resolve: Callable[[str], ModelSpec | None], description: str) -> None:
    """Ask ``resolve`` for names no builder registered; registered names always win."""
    _FALLBACKS.append((resolve, description))


def list_models() -> list[str]:
    """The names registered with ``register_model`` (fallbacks' names not included)."""
    return sorted(_REGISTRY)


def known_models() -> str:
    """The known names as an error message or a --help says them."""
    return ", ".join(list_models() + [f"or {d}" for _, d in _FALLBACKS])


def get_spec(name: str) -> ModelSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    for resolve, _ in _FALLBACKS:
        spec = resolve(name)
        if spec is not None:
            return spec
    raise ValueError(f"unknown model {name!r}; known: {known_models()}")


def get_model(name: str, num_classes: int, **options) -> nn.Module:
    """Build model ``name`` with a head of ``num_classes`` outputs.

    Options are the builder's keywords (weights, weights_file, unfreeze_layer3, ...).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return get_spec(name).build(num_classes=num_classes, **options)
