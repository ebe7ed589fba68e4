"""Optimisers, learning-rate schedules and the head/backbone split of staged fine-tuning.

Small lookup tables rather than if/elif chains: a new optimiser or schedule is one entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OptimSettings:
    """What the optimiser and the learning-rate schedule need to know of a run."""

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    norm_bias_decay: float | None = None  # None: as weight_decay
    schedule: str = "none"
    warmup_epochs: int = 0
    epochs: int = 10
    step_size: int = 5  # step: epochs between decays
    gamma: float = 0.1  # step and plateau: decay factor
    plateau_patience: int = 2
    min_lr_factor: float = 0.0  # cosine: final lr / initial lr


OPTIMIZERS = {
    "sgd": lambda groups, s: torch.optim.SGD(
        groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
    ),
    "adam": lambda groups, s: torch.optim.Adam(groups, lr=s.lr, weight_decay=s.weight_decay),
    "adamw": lambda groups, s: torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay),
}

# Layers whose parameters set a scale and shift, not features: decaying them towards zero
# fights the normalisation (torchvision's --norm-weight-decay, timm's no-decay list).
NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)

SCHEDULES = ("none", "step", "plateau", "cosine", "onecycle")
# Schedules stepped after every optimiser step rather than every epoch: a short fine-tuning
# run has few epochs, and a warm-up of one whole epoch would be a large part of it.
PER_STEP_SCHEDULES = ("onecycle",)


def split_parameters(model: nn.Module, head: str) -> tuple[list, list]:
    """(head parameters, trainable backbone parameters).

    ``head`` is the registry's name of the classifier module ("fc", "classifier");
    a wrapper such as WithImageNetHead holds the network as ``model``.
    """
    prefixes = (f"{head}.", f"model.{head}.")
    head_params, backbone = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (head_params if name.startswith(prefixes) else backbone).append(p)
    if not head_params:
        raise ValueError(f"no trainable parameters under {head!r}: is the registry's head right?")
    return head_params, backbone


def norm_and_bias_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of normalisation layers and of every bias."""
    ids = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    return ids | {id(p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}


def decay_groups(params: list, group: dict, s: OptimSettings, exempt: set[int]) -> list[dict]:
    """``group`` for ``params``, split in two where norms and biases decay at another rate
    (``s.norm_bias_decay``); empty groups are left out."""
    other = s.norm_bias_decay
    if other is None or other == s.weight_decay:
        return [{"params": params, **group}]
    decayed = [p for p in params if id(p) not in exempt]
    exempted = [p for p in params if id(p) in exempt]
    return ([{"params": decayed, **group}] if decayed else []) + (
        [{"params": exempted, **group, "weight_decay": other, "decay": "norm_bias"}] if exempted else []
    )


def build_optimizer(
    head_params: list, backbone: list, s: OptimSettings, backbone_scale: float, model: nn.Module | None = None
) -> torch.optim.Optimizer:
    """One optimiser, two groups: the head at ``lr``, the backbone at ``lr * backbone_scale``;
    each split once more when norms and biases decay at ``s.norm_bias_decay`` (``model``
    tells which they are).

    All groups exist from the start, so the optimiser's state and a resumed run do
    not depend on the stage; while the backbone is frozen its gradients are None and
    the optimiser leaves it alone.
    """
    exempt = norm_and_bias_ids(model) if model is not None else set()
    groups = decay_groups(head_params, {"lr": s.lr, "name": "head"}, s, exempt)
    if backbone:
        groups += decay_groups(backbone, {"lr": s.lr * backbone_scale, "name": "backbone"}, s, exempt)
    return OPTIMIZERS[s.optimizer](groups, s)


def lr_factor(epoch: int, s: OptimSettings) -> float:
    """Multiplier of each group's base learning rate for ``epoch`` (0-based): linear warmup
    over ``warmup_epochs``, then the step or cosine schedule over the remaining epochs."""
    if epoch < s.warmup_epochs:
        return (epoch + 1) / (s.warmup_epochs + 1)
    e = epoch - s.warmup_epochs
    if s.schedule == "step":
        return s.gamma ** (e // s.step_size)
    if s.schedule == "cosine":
        t = e / max(1, s.epochs - s.warmup_epochs)
        return s.min_lr_factor + (1 - s.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, s: OptimSettings, steps_per_epoch: int = 1):
    """Stepped once per epoch; ``plateau`` is stepped with the validation loss, ``onecycle``
    after every optimiser step (``steps_per_epoch`` of them per epoch)."""
    if s.schedule == "onecycle":
        return one_cycle(optimizer, s, steps_per_epoch)
    if s.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=s.gamma, patience=s.plateau_patience
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, s))


def one_cycle(optimizer: torch.optim.Optimizer, s: OptimSettings, steps_per_epoch: int):
    """torch's OneCycleLR over the whole run: each group rises from a 25th of its rate to it
    over the warm-up (``warmup_epochs``, else the first 30% of the steps), then falls to
    about zero along a cosine; the momentum (Adam's beta1) cycles the other way, 0.95 to
    0.85 and back, except for SGD without momentum, which stays without."""
    total = max(2, s.epochs * steps_per_epoch)
    rise = total * (s.warmup_epochs / s.epochs if s.warmup_epochs else 0.3)
    # OneCycleLR divides by the length of each phase: both must be over one step long.
    rise = min(max(rise, 1.5), total - 0.5)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=total,
        pct_start=rise / total,
        cycle_momentum=s.optimizer != "sgd" or s.momentum > 0,
    )


def set_backbone_trainable(backbone: list, trainable: bool) -> None:
    for p in backbone:
        p.requires_grad_(trainable)
