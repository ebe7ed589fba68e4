"""Mixup and CutMix per batch (torchvision.transforms.v2), seeded so that a run repeats.

With probability ``prob`` a batch is mixed with itself rolled by one (v2's pairing):
by CutMix with probability ``switch_prob`` when both are on, else by Mixup, with the
mixing weight drawn from Beta(alpha, alpha). The labels become class probabilities,
which nn.CrossEntropyLoss takes as they are (label smoothing included). timm applies
the same choice per batch (its mixup-prob and mixup-switch-prob).

v2's transforms draw from torch's global generator; each batch's draws are made inside
a fork of it seeded by (seed, epoch, step), so they are the same whatever happened
before: in a resumed run, under any number of loader workers.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

# Keeps the batches' seeds apart from the images' (training.data.datasets.SeededSamples), which
# are built from the same (seed, epoch) and an image index that can equal a step.
STREAM = 1 << 48


class BatchMix:
    """Mixes a batch (images, integer labels) into (images, class probabilities), or leaves it."""

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        seed: int = 0,
    ):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(
                f"mixup and cutmix alphas must be >= 0 (0: off), got {mixup_alpha}, {cutmix_alpha}"
            )
        for name, p in (("mix prob", prob), ("mix switch prob", switch_prob)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} is a probability in 0..1, got {p}")
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha else None
        self.cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha else None
        self.prob, self.switch_prob, self.seed = prob, switch_prob, seed

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup or self.cutmix) is not None

    def _pick(self):
        if self.mixup is None or self.cutmix is None:
            return self.mixup or self.cutmix
        return self.cutmix if torch.rand(()) < self.switch_prob else self.mixup

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int):
        if not self.active:
            return x, y
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(STREAM + (self.seed * 1_000_003 + epoch) * 10_000_019 + step)
            if torch.rand(()) >= self.prob:
                return x, y
            return self._pick()(x, y)
