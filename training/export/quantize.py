"""int8 post-training quantisation of a trained model, for serving on x86 CPUs.

    python -m training.export --checkpoint runs/dog_breeds/best.pt --out export/dog_breeds \
        --quantize int8 --calibration-data data/dogImages

FX graph mode static quantisation: convolutions and linear layers with per-channel int8
weights and int8 activations, their ranges observed on ``--calibration-images`` training
images through the eval preprocessing (the one serving uses). The forward pass runs
several times faster than the fp32 model as the handler serves it (docs/export.md).

Quantisation changes the outputs, so the export measures what it costs before writing
anything: the fp32 and int8 models both predict the test split, and the export fails
(nothing written) when the int8 top-1 accuracy is more than ``--max-accuracy-drop``
points below the fp32 one. The result is saved as quantization.json beside model.pt.

The quantised kernels are CPU kernels of one engine (``torch.backends.quantized``):
the export records it in model-config.yaml (``quantized_engine``) and the handler sets
it before loading. On a CUDA worker an int8 model runs on the CPU (the handler says so).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch.ao.quantization import get_default_qconfig_mapping, quantize_fx
from torch.utils.data import DataLoader, Subset

from handlers.preset import EvalPreset
from training.export import gate
from training.progress import Progress

# onednn: faster than x86/fbgemm on the machines measured and, with its full 8-bit
# activation range, closer to fp32 (docs/export.md). x86 is PyTorch's portable choice
# for older CPUs.
ENGINES = ("onednn", "x86", "fbgemm")
DEFAULT_ENGINE = "onednn"
BATCH = 16


def check_engine(engine: str) -> None:
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise RuntimeError(
            f"quantized engine {engine!r} is not available in this torch build "
            f"(supported: {', '.join(e for e in supported if e != 'none')})"
        )


def calibration_set(root: Path, preset: EvalPreset, classes: list[str], n: int, seed: int = 0):
    """``n`` training images in the eval preprocessing, drawn at random (fixed seed).

    The dataset's class folders must be the model's classes (``gate.dataset``)."""
    ds = gate.dataset(root, "train", preset, classes)
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    return Subset(ds, order[:n])


def quantize_int8(model: torch.nn.Module, calibration, engine: str = DEFAULT_ENGINE) -> torch.nn.Module:
    """The model with int8 convolutions/linears; activation ranges observed on ``calibration``."""
    check_engine(engine)
    torch.backends.quantized.engine = engine
    batches = DataLoader(calibration, batch_size=BATCH)
    example = next(iter(batches))[0]
    prepared = quantize_fx.prepare_fx(model.eval(), get_default_qconfig_mapping(engine), (example,))
    progress = Progress(len(batches), "calibrating")
    with torch.inference_mode():
        for i, (x, _) in enumerate(batches, 1):
            prepared(x)
            progress.update(i)
    return quantize_fx.convert_fx(prepared)
