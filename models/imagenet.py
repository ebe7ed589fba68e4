"""ImageNet's classes beside a model's own: the dog detector of the dog-breed app.

The original app called an image a dog when its top ImageNet class was a dog breed (classes
151 to 268). The dog app now sums the probabilities over groups of classes (``verdict`` in
handlers/dog_breeds.py, since a handler's archive ships no module of this one): a dog is an image whose
breeds together outweigh the other animals; an animal is one whose animal classes make most of
it, so that a face found in it is not a person's. Two ways to have ImageNet's classes as a
model's second output:

- ``WithImageNetGate``: any classifier, with a pretrained ImageNet network beside it
  that sees the same crop (the export adds it to dog-breed models that have no
  ImageNet head of their own).
- ``ImageNetSubset``: a pretrained ImageNet network whose own answer is a subset of its
  classes (``imagenet_dogs``: the 118 breeds), with all 1000 as the second output,
  from one forward pass.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from handlers.preset import EvalPreset
from handlers.settings import DogBreedSettings

# ImageNet-1k class indices of the dog breeds, first and last (inclusive).
DOG_CLASSES = DogBreedSettings.dog_classes


@functools.lru_cache(maxsize=1)
def categories() -> tuple[str, ...]:
    """ImageNet-1k's 1000 class names, as torchvision ships them (no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def dog_breeds() -> list[str]:
    """The names of ImageNet's dog classes, in class order."""
    first, last = DOG_CLASSES
    return list(categories()[first : last + 1])


class ImageNetSubset(nn.Module):
    """An ImageNet classifier answering ``classes`` (first, last inclusive) of its 1000:
    forward returns (the subset's logits, all 1000 logits)."""

    def __init__(self, model: nn.Module, classes: tuple[int, int] = DOG_CLASSES):
        super().__init__()
        self.model = model
        self.first, self.last = classes

    def forward(self, x):
        logits = self.model(x)
        return logits[:, self.first : self.last + 1], logits


class WithImageNetGate(nn.Module):
    """A classifier and a pretrained ImageNet network on the same crop: forward returns
    (the classifier's logits, ImageNet's 1000 logits).

    The two may expect different normalisations of the same Resize / CenterCrop: the
    gate's input is the classifier's input with the normalisations converted
    per channel, x * std / gate_std + (mean - gate_mean) / gate_std.
    """

    def __init__(self, model: nn.Module, gate: nn.Module, preset: EvalPreset, gate_preset: EvalPreset):
        super().__init__()
        if (preset.resize_size, preset.crop_size) != (gate_preset.resize_size, gate_preset.crop_size):
            raise ValueError(
                f"the ImageNet gate crops {gate_preset.resize_size}/"
                f"{gate_preset.crop_size}, the model {preset.resize_size}/"
                f"{preset.crop_size}: they must see the same crop"
            )
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (preset.mean, preset.std))
        g_mean, g_std = (torch.tensor(v).view(1, -1, 1, 1) for v in (gate_preset.mean, gate_preset.std))
        self.model, self.gate = model, gate
        self.register_buffer("scale", std / g_std)
        self.register_buffer("shift", (mean - g_mean) / g_std)

    def forward(self, x):
        return self.model(x), self.gate(x * self.scale + self.shift)
