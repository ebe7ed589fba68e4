"""The methods of an exported model's TorchScript file, traced together and frozen.

- ``forward``: the model (what /predictions runs).
- ``forward_bf16`` (``bf16=True``): its bfloat16 copy, float32 in and out
  (handlers/precision.py; the gate in training/export/bf16.py).
- ``cam_features`` and ``cam_head`` (when models/cam.py finds the split): the last
  convolutional features and the classifier on them, for class activation maps
  (handlers/explain.py). ``cam_head(cam_features(x))`` is the answer's logits.

Each method is traced on its own, so ``forward`` is the same graph whatever else the
file holds; the handler uses the others only when asked.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from handlers.explain import CAM_FEATURES, CAM_HEAD
from handlers.precision import BF16_METHOD
from models import cam


def _as_float(out):
    return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()


class Exported(nn.Module):
    """The model with the optional methods above (only those traced are kept)."""

    def __init__(self, model: nn.Module, bf16: bool = False, explain: bool = True, crop: int = 224):
        super().__init__()
        self.fp32 = model
        self.bf16 = copy.deepcopy(model).to(torch.bfloat16) if bf16 else None
        parts = cam.split(model, crop) if explain else None
        self.features, self.head = parts or (None, None)

    def forward(self, x):
        return self.fp32(x)

    def forward_bf16(self, x):
        return _as_float(self.bf16(x.to(torch.bfloat16)))

    def cam_features(self, x):
        return self.features(x)

    def cam_head(self, a):
        return self.head(a)

    def examples(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each method this module has, with the input it is traced on."""
        inputs = {"forward": x}
        if self.bf16 is not None:
            inputs[BF16_METHOD] = x
        if self.features is not None:
            with torch.no_grad():
                inputs[CAM_FEATURES], inputs[CAM_HEAD] = x, self.features(x)
        return inputs


def to_torchscript(model: nn.Module, crop: int, bf16: bool = False, explain: bool = True):
    """The eval-mode model's methods traced on a batch of two crops, then frozen (the
    methods beside ``forward`` preserved)."""
    module = Exported(model.eval(), bf16, explain, crop).eval()
    example = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    inputs = module.examples(example)
    with torch.no_grad():
        traced = torch.jit.trace_module(module, inputs, check_trace=False)
    return torch.jit.freeze(traced, preserved_attrs=[k for k in inputs if k != "forward"])
