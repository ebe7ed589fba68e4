"""The trainer's settings as one typed object, built once from the flags (and recipe).

Library code (the run, the optimiser, the checkpoint) reads these fields, never an
argparse namespace, so a flag's spelling is the parser's business only. Every flag of
``python -m training.fit.train`` is a field here of the same name (tests check both
lists agree), and ``asdict`` of it is what settings.yaml and the checkpoint record.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from training.fit.optim import OptimSettings


@dataclass
class TrainSettings:
    model: str
    data: Path
    out: Path
    recipe: str | None = None
    epochs: int = OptimSettings.epochs
    batch_size: int = 32
    # optimisation (OptimSettings)
    optimizer: str = OptimSettings.optimizer
    lr: float = OptimSettings.lr
    momentum: float = OptimSettings.momentum
    weight_decay: float = OptimSettings.weight_decay
    norm_bias_decay: float | None = OptimSettings.norm_bias_decay
    schedule: str = OptimSettings.schedule
    warmup_epochs: int = OptimSettings.warmup_epochs
    step_size: int = OptimSettings.step_size
    gamma: float = OptimSettings.gamma
    plateau_patience: int = OptimSettings.plateau_patience
    min_lr_factor: float = OptimSettings.min_lr_factor
    label_smoothing: float = 0.0
    balance: str = "none"
    amp: bool = True
    ema_decay: float = 0.0
    # augmentation: None is the architecture's own choice until resolved
    hflip: float | None = None
    rotation: float | None = None
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] | None = None
    color_jitter: float | None = None
    auto_augment: str | None = None
    random_erasing: float | None = None
    train_crop_size: int | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    # staged fine-tuning
    head_epochs: int = 0
    backbone_lr_scale: float = 0.1
    train_all_layers: bool = False
    bn_stats: str = "update"
    probe: bool = True
    # model
    weights: str | None = "DEFAULT"
    weights_file: Path | None = None
    unfreeze_layer3: bool = False
    unfreeze_blocks: int | None = None
    imagenet_head: bool = False
    dropout: float | None = None
    resize_size: int | None = None
    crop_size: int | None = None
    # run
    patience: int = 0
    min_delta: float = 0.0
    resume: bool = False
    restart: bool = False
    workers: int = 2
    seed: int = 0
    analysis: bool = True

    @classmethod
    def defaults(cls) -> dict:
        """Field -> default, for the fields that have one: the parser's defaults."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> TrainSettings:
        values = vars(ns)
        return cls(**{f.name: _tuple(values[f.name]) for f in dataclasses.fields(cls)})

    @property
    def pretrained(self) -> bool:
        return bool(self.weights or self.weights_file)

    @property
    def optim(self) -> OptimSettings:
        return OptimSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(OptimSettings)})

    def plain(self, leave_out: tuple[str, ...] = ()) -> dict:
        """Field -> value with paths as strings and pairs as lists: what YAML and a
        weights-only checkpoint can hold."""
        return {
            k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()
            if k not in leave_out
        }


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value
