"""Training's augmentation (``TrainPreset``): the training side only, never shipped in
an archive. Normalisation and the default crop size follow the eval preset
(handlers/preset.py), so training and serving see pixels on one scale.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchvision import transforms as T

from handlers.preset import EvalPreset, plain_dict

# TrainPreset.auto_augment: torchvision's learned or random augmentation policies by name.
AUTO_AUGMENT = {
    "none": None,
    "trivialaugment": T.TrivialAugmentWide,
    "randaugment": T.RandAugment,
    "autoaugment": T.AutoAugment,
}


@dataclass(frozen=True)
class TrainPreset:
    """Augmentation for training; normalisation follows the eval preset, and so does the
    crop size unless ``crop_size`` sets a training resolution of its own (FixRes: a
    smaller train crop than the eval crop, as torchvision's recipe trains at 176 and
    evaluates at 224).

    Steps, each left out where its setting makes it do nothing: RandomResizedCrop
    (``scale``, ``ratio``), RandomRotation, RandomHorizontalFlip, ColorJitter, one
    ``auto_augment`` policy, ToTensor, Normalize, RandomErasing.
    """

    rotation: float = 15.0
    hflip: float = 0.5
    color_jitter: float = 0.0
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    auto_augment: str = "none"
    random_erasing: float = 0.0
    crop_size: int | None = None

    def __post_init__(self):
        if self.auto_augment not in AUTO_AUGMENT:
            raise ValueError(f"auto_augment {self.auto_augment!r}; known: {', '.join(AUTO_AUGMENT)}")
        for name in ("hflip", "random_erasing"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability in 0..1, got {getattr(self, name)}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale {self.scale}: a range of area fractions, 0 < min <= max <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio {self.ratio}: a range of aspect ratios, 0 < min <= max")

    def to_dict(self) -> dict:
        return plain_dict(self)

    def transform(self, eval_preset: EvalPreset) -> T.Compose:
        crop = self.crop_size or eval_preset.crop_size
        steps = [T.RandomResizedCrop(crop, scale=self.scale, ratio=self.ratio)]
        if self.rotation:
            steps.append(T.RandomRotation(self.rotation))
        if self.hflip:
            steps.append(T.RandomHorizontalFlip(self.hflip))
        if self.color_jitter:
            j = self.color_jitter
            steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
        if AUTO_AUGMENT[self.auto_augment]:
            steps.append(AUTO_AUGMENT[self.auto_augment]())
        steps += [T.ToTensor(), T.Normalize(eval_preset.mean, eval_preset.std)]
        if self.random_erasing:
            steps.append(T.RandomErasing(self.random_erasing))
        return T.Compose(steps)
