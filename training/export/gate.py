"""The accuracy gate of a reduced-precision export (int8, bf16): the fp32 model and the
reduced one predict a split of the dataset the model learnt, and the export refuses,
writing nothing, when top-1 accuracy drops by more than a limit."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from handlers.preset import EvalPreset
from training.data.datasets import image_folder
from training.evaluation.evaluate import class_logits
from training.progress import Progress

BATCH = 16


@dataclass
class Comparison:
    """fp32 against a reduced precision (``kind``) on one split: top-1 accuracy of each
    and their agreement."""

    split: str
    images: int
    fp32_correct: int
    other_correct: int
    agree: int
    max_probability_diff: float
    kind: str = "int8"

    @property
    def accuracy_drop(self) -> float:
        """Percentage points of top-1 accuracy lost (negative: the reduced model did better)."""
        return 100.0 * (self.fp32_correct - self.other_correct) / max(self.images, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d[f"{self.kind}_correct"] = d.pop("other_correct")
        d.pop("kind")
        return {**d, "accuracy_drop_points": round(self.accuracy_drop, 3)}

    def __str__(self) -> str:
        n = self.images
        return (
            f"{self.split}: top-1 fp32 {self.fp32_correct}/{n}, {self.kind} {self.other_correct}/{n} "
            f"(drop {self.accuracy_drop:.1f} points), same top-1 on {self.agree}/{n}, "
            f"max probability difference {self.max_probability_diff:.3f}"
        )


def dataset(root: Path, split: str, preset: EvalPreset, classes: list[str]):
    """``split`` of the dataset at ``root`` in the eval preprocessing. Its class folders
    must be the model's classes: a different dataset would check the model on images it
    was not trained for."""
    ds = image_folder(root, split, preset.transform())
    if ds.classes != list(classes):
        raise ValueError(
            f"{root}/{split}/ has classes {ds.classes[:5]}... ({len(ds.classes)}), the "
            f"model {list(classes)[:5]}... ({len(classes)}): give the dataset the model "
            f"was trained on"
        )
    return ds


def compare(fp32, other, images, split: str, kind: str = "int8") -> Comparison:
    """Both models on ``images`` (``split`` of a dataset, ``dataset``), class probabilities
    compared."""
    batches = DataLoader(images, batch_size=BATCH)
    c = Comparison(split, 0, 0, 0, 0, 0.0, kind)
    progress = Progress(len(batches), f"comparing fp32 and {kind} on {split}/")
    with torch.inference_mode():
        for i, (x, y) in enumerate(batches, 1):
            p32, po = (class_logits(m(x)).float().softmax(1) for m in (fp32, other))
            c.images += len(y)
            c.fp32_correct += int((p32.argmax(1) == y).sum())
            c.other_correct += int((po.argmax(1) == y).sum())
            c.agree += int((p32.argmax(1) == po.argmax(1)).sum())
            c.max_probability_diff = max(c.max_probability_diff, float((p32 - po).abs().max()))
            progress.update(i)
    return c


def loss(result: Comparison, limit: float, flag: str) -> str | None:
    """What ``result`` loses, when it drops more than ``limit`` points; None when it passes."""
    if result.accuracy_drop > limit:
        return f"{result.kind} loses {result.accuracy_drop:.1f} points of top-1 accuracy ({flag} {limit})"
    return None


def refuse(reason: str | None, advice: str) -> None:
    """SystemExit, before anything is written, when the gate found a ``reason``."""
    if reason:
        raise SystemExit(f"export stopped, nothing written: {reason}; {advice}")
