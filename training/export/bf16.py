"""bf16 at export: the accuracy gate the model's bfloat16 copy must pass to be offered.

The file's ``forward`` is the fp32 model exactly as before; its ``forward_bf16`` runs a
bfloat16 copy of the weights on the input cast to bfloat16 and returns float32 outputs
(traced beside it by training/export/methods.py).
The handler picks one at worker start (handlers/precision.py). Before anything is written
the copy is measured against fp32, on the validation split of ``--data`` (top-1
accuracy of each and their agreement), else on real photos (the packaged ones, and
../shared/photos when present: agreement only, no labels); the export refuses when
accuracy drops by more than ``--max-bf16-drop`` points, or, without labels, when a photo
whose fp32 answer is decisive changes class.
"""

from __future__ import annotations

from pathlib import Path

import torch

from handlers.decode import open_image
from handlers.optimize import Method, tensors
from handlers.optimize import compare as compare_outputs
from handlers.precision import BF16_METHOD, BF16_RTOL
from handlers.preset import EvalPreset
from training.demo.photos import SHARED_PHOTOS, photos
from training.export import gate

REPORT_FILE = "bf16.json"


def on_split(module, root: Path, preset: EvalPreset, classes: list[str]) -> gate.Comparison:
    """fp32 against bf16 on the validation split of the dataset the model learnt."""
    valid = gate.dataset(root, "valid", preset, classes)
    return gate.compare(module, Method(module, BF16_METHOD), valid, "valid", kind="bf16")


def photo_paths() -> list[Path]:
    """The real photos of training.demo.photos: ../shared/photos with its dogs/ and
    people/ when present, and those that come with installed packages."""
    found = {**photos(SHARED_PHOTOS / "dogs"), **photos(SHARED_PHOTOS / "people"), **photos(SHARED_PHOTOS)}
    return [p for p in found.values() if p.exists()]


def keeps_decisive_answers(agreement) -> bool:
    """The verdict without labels: every answer that fp32 gives by a margin over BF16_RTOL of
    the outputs' scale keeps its class (and the outputs are comparable at all)."""
    return not agreement.mismatch and agreement.flipped_rows == 0


def on_photos(module, preset: EvalPreset) -> dict:
    """fp32 against bf16 on real photos, without labels: top-1 agreement, and whether the
    answers fp32 gives decisively keep their class (``keeps_decisive_answers``)."""
    t = preset.transform()
    paths = photo_paths()
    x = torch.stack([t(open_image(p)) for p in paths])

    def logits(model) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([tensors(model(x[i : i + gate.BATCH]))[0] for i in range(0, len(x), gate.BATCH)])

    fp32, bf16 = logits(module), logits(Method(module, BF16_METHOD))
    agreement = compare_outputs(bf16, fp32, BF16_RTOL)
    return {
        "images": len(paths),
        "agree": int((fp32.argmax(1) == bf16.argmax(1)).sum()),
        "max_probability_diff": float((fp32.softmax(1) - bf16.softmax(1)).abs().max()),
        "outputs": str(agreement),
        "ok": keeps_decisive_answers(agreement),
    }
