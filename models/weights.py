"""Pretrained weights: by torchvision name (downloaded), from a local file, or none."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had; the message says what to do."""


def torchvision_model(
    tv_name: str, weights: str | None = None, weights_file: str | Path | None = None
) -> nn.Module:
    """Build torchvision's ``tv_name`` with its ImageNet head and the requested weights.

    weights: a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), fetched through
    torchvision's weights API (cached under $TORCH_HOME); None for random weights.
    weights_file: a local state dict of the same torchvision model, for offline machines.
    """
    if weights and weights_file:
        raise ValueError("give --weights or --weights-file, not both")
    if weights_file:
        return _from_file(tv_name, Path(weights_file))
    if not weights:
        return tvm.get_model(tv_name, weights=None)
    enum = tvm.get_model_weights(tv_name)
    try:
        w = enum[weights]
    except KeyError:
        known = ", ".join(["DEFAULT", *enum.__members__.keys() - {"DEFAULT"}])
        raise ValueError(f"unknown weights {weights!r} for {tv_name}; known: {known}, none") from None
    try:
        return tvm.get_model(tv_name, weights=w)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsUnavailable(
            f"cannot download {tv_name} weights {w.name} ({reason}). On an offline machine, "
            f"fetch {w.url} elsewhere and pass --weights-file PATH, or use --weights none."
        ) from e


def _from_file(tv_name: str, path: Path) -> nn.Module:
    if not path.is_file():
        raise WeightsUnavailable(f"--weights-file {path}: no such file")
    model = tvm.get_model(tv_name, weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise WeightsUnavailable(f"--weights-file {path} is not a {tv_name} state dict: {first}") from e
    return model
