"""Where a classifier's last convolutional features are: the split that class activation
maps need (Grad-CAM, handlers/explain.py).

``split(model)`` returns (features, head): two modules with
``head(features(x))`` equal to the model's class logits (its first output), or None when
the network has no such split (an int8 model, a transformer, an unknown layout). The
export traces the two as methods of the model's TorchScript file, beside ``forward``;
``verified_split`` keeps a split only when it reproduces the model's answers.

Known layouts: torchvision's ResNets (conv1 .. layer4, then avgpool and fc); networks with
``features`` and ``classifier`` (MobileNetV2, EfficientNet, EfficientNet-Lite, the scratch
CNN, VGG, ...), pooled by their ``avgpool`` or globally; and the project's wrappers, whose
answer is the wrapped model's (models/imagenet.py, models/architectures.py).
"""

from __future__ import annotations

import torch
from torch import nn

from handlers.optimize import compare, tensors

# The candidate heads a features/classifier network may have, tried in order.
_POOLINGS = ("avgpool_flatten", "avgpool", "global", "none")


class ResNetFeatures(nn.Module):
    """conv1 .. layer4 of a torchvision ResNet: its last convolutional features."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        m = self.m
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))


class PooledHead(nn.Module):
    """A classifier on features: pooled by ``pool`` (``_POOLINGS``), then ``classifier``."""

    def __init__(self, classifier: nn.Module, pool: str, avgpool: nn.Module | None = None):
        super().__init__()
        self.classifier, self.pool, self.avgpool = classifier, pool, avgpool

    def forward(self, a):
        if self.pool == "avgpool_flatten":
            a = torch.flatten(self.avgpool(a), 1)
        elif self.pool == "avgpool":
            a = self.avgpool(a)
        elif self.pool == "global":
            a = torch.flatten(nn.functional.adaptive_avg_pool2d(a, 1), 1)
        return self.classifier(a)


class SubsetHead(nn.Module):
    """The logits of classes first..last of ``head``'s (models.imagenet.ImageNetSubset)."""

    def __init__(self, head: nn.Module, first: int, last: int):
        super().__init__()
        self.head, self.first, self.last = head, first, last

    def forward(self, a):
        return self.head(a)[:, self.first : self.last + 1]


def _candidates(model: nn.Module):
    """Possible (features, head) splits of ``model``, most likely first."""
    from models.architectures import WithImageNetHead
    from models.imagenet import ImageNetSubset, WithImageNetGate

    if isinstance(model, (WithImageNetGate, WithImageNetHead)):
        yield from _candidates(model.model)  # the answer is the wrapped model's
        return
    if isinstance(model, ImageNetSubset):
        for features, head in _candidates(model.model):
            yield features, SubsetHead(head, model.first, model.last)
        return
    if all(hasattr(model, k) for k in ("conv1", "layer4", "avgpool", "fc")):
        yield ResNetFeatures(model), PooledHead(model.fc, "avgpool_flatten", model.avgpool)
    if isinstance(getattr(model, "features", None), nn.Module) and hasattr(model, "classifier"):
        avgpool = getattr(model, "avgpool", None)
        for pool in _POOLINGS:
            if pool.startswith("avgpool") and avgpool is None:
                continue
            yield model.features, PooledHead(model.classifier, pool, avgpool)


def split(model: nn.Module, crop: int = 224) -> tuple[nn.Module, nn.Module] | None:
    """The first (features, head) of ``model`` whose head of the features computes the
    model's class logits (within float32's rounding of a reordered computation), on a
    batch of two random crops; None when no known layout does."""
    model = model.eval()
    x = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = tensors(model(x))[0]
        for features, head in _candidates(model):
            try:
                a = features(x)
                got = head(a) if a.dim() == 4 else None
            except (RuntimeError, TypeError, ValueError):
                continue
            if got is not None and compare(got, want).ok:
                return features, head
    return None
