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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.ao.quantization import get_default_qconfig_mapping, quantize_fx
from torch.utils.data import DataLoader, Subset

from handlers.preset import EvalPreset
from training.data.datasets import image_folder
from training.evaluation.evaluate import class_logits
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

    The dataset's class folders must be the model's classes: a different dataset would
    calibrate (and check) the model on images it was not trained for."""
    ds = image_folder(root, "train", preset.transform())
    if ds.classes != list(classes):
        raise ValueError(
            f"{root}/train/ has classes {ds.classes[:5]}... ({len(ds.classes)}), the "
            f"model {list(classes)[:5]}... ({len(classes)}): calibrate on the "
            f"dataset the model was trained on"
        )
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


@dataclass
class Comparison:
    """fp32 against int8 on one split: top-1 accuracy of each and their agreement."""

    split: str
    images: int
    fp32_correct: int
    int8_correct: int
    agree: int
    max_probability_diff: float

    @property
    def accuracy_drop(self) -> float:
        """Percentage points of top-1 accuracy lost (negative: int8 did better)."""
        return 100.0 * (self.fp32_correct - self.int8_correct) / max(self.images, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy_drop_points": round(self.accuracy_drop, 3)}

    def __str__(self) -> str:
        n = self.images
        return (
            f"{self.split}: top-1 fp32 {self.fp32_correct}/{n}, int8 {self.int8_correct}/{n} "
            f"(drop {self.accuracy_drop:.1f} points), same top-1 on {self.agree}/{n}, "
            f"max probability difference {self.max_probability_diff:.3f}"
        )


def compare(
    fp32: torch.nn.Module, int8: torch.nn.Module, root: Path, preset: EvalPreset, split: str = "test"
) -> Comparison:
    """Both models on ``split`` of the dataset at ``root``, class probabilities compared."""
    ds = image_folder(root, split, preset.transform())
    batches = DataLoader(ds, batch_size=BATCH)
    c = Comparison(split, 0, 0, 0, 0, 0.0)
    progress = Progress(len(batches), f"comparing fp32 and int8 on {split}/")
    with torch.inference_mode():
        for i, (x, y) in enumerate(batches, 1):
            p32, p8 = (class_logits(m(x)).float().softmax(1) for m in (fp32, int8))
            c.images += len(y)
            c.fp32_correct += int((p32.argmax(1) == y).sum())
            c.int8_correct += int((p8.argmax(1) == y).sum())
            c.agree += int((p32.argmax(1) == p8.argmax(1)).sum())
            c.max_probability_diff = max(c.max_probability_diff, float((p32 - p8).abs().max()))
            progress.update(i)
    return c
