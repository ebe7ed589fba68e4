"""Export the demo's architectures and optimise them as the handler does, in this process's
kernels; print what was measured as one JSON line prefixed ``RESULT``.

    ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 python -m tests.kernel_probe OUT_DIR

The instruction set that PyTorch and oneDNN choose is fixed when the process starts,
so tests/test_kernels.py runs this once per setting in a fresh process.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import skimage
import torch

from handlers.decode import open_image
from handlers.image_classifier import ImageClassifier
from handlers.optimize import RTOL, compare
from handlers.precision import BF16_RTOL
from handlers.preset import EvalPreset
from models.zoo import get_model, get_spec
from tests.conftest import make_context
from training.export import pretrained
from training.export import torchscript as export_mod
from training.export.bf16 import keeps_decisive_answers
from training.fit import train as train_mod
from training.fit.checkpoint import checkpoint, load_checkpoint, model_options

# The demo's two trained architectures, as `make demo` trains them, and its pretrained
# EfficientNet-Lite0 with its real ImageNet weights (imagenet_dogs, also the dog detector).
ARCHS = {"resnet50": (133, []), "mobilenet_v2": (4, ["--unfreeze-blocks", "19"])}
PRETRAINED = ("imagenet_dogs",)
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "horse.png",
    "retina.jpg",
    "hubble_deep_field.jpg",
)


def photo_batch(preset: EvalPreset) -> torch.Tensor:
    """scikit-image's bundled photos through the eval transform."""
    folder = Path(skimage.__file__).parent / "data"
    return torch.stack([preset.transform()(open_image(folder / name)) for name in PHOTOS])


def trained_like(arch: str, classes: int, options: list[str], photos: torch.Tensor):
    """A seeded network whose BatchNorm statistics come from real photos: random weights,
    but every layer's activations at the scale a trained network's have."""
    torch.manual_seed(0)
    a = train_mod.parse_args(["--model", arch, "--data", ".", "--out", ".", "--weights", "none", *options])
    model = get_model(arch, classes, **model_options(a))
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for flip in (False, True):
            model(photos.flip(-1) if flip else photos)
    return model.eval(), a


def saved_checkpoint(arch: str, out: Path, photos: torch.Tensor) -> tuple[Path, torch.nn.Module]:
    """A checkpoint as training writes it, and its eager model."""
    if arch in PRETRAINED:
        path = pretrained.write(arch, out / f"{arch}_run")
        return path, load_checkpoint(path)[0]
    classes, options = ARCHS[arch]
    model, a = trained_like(arch, classes, options, photos)
    ckpt = checkpoint(model, a, [f"class_{i}" for i in range(classes)], EvalPreset(), epoch=1, valid={})
    torch.save(ckpt, out / f"{arch}.pt")
    return out / f"{arch}.pt", model


def export(arch: str, out: Path, photos: torch.Tensor) -> tuple[Path, torch.nn.Module, dict]:
    """The model exported by training.export (which checks its own round trip on noise),
    and how the file agrees with the eager model on the photos."""
    path, model = saved_checkpoint(arch, out, photos)
    # fp32: the bf16 gate on a hundred photos would take most of an hour where bf16 is
    # emulated (tests/test_bf16.py tests it); the copy is added by with_bf16_copy
    ex = export_mod.parse_args(["--checkpoint", str(path), "--out", str(out / arch), "--precision", "fp32"])
    export_mod.export(path, out / arch, ex)
    with torch.inference_mode():
        agreement = compare(torch.jit.load(str(out / arch / export_mod.MODEL_FILE))(photos), model(photos))
    return (
        out / arch,
        model,
        {"agreement": str(agreement), "ok": agreement.ok, "relative": agreement.relative},
    )


def with_bf16_copy(export_dir: Path, eager: torch.nn.Module, crop: int) -> Path:
    """The export beside it, its model.pt with the bf16 copy that training.export adds
    (training/export/methods.py's tracing, without the gate)."""
    out = export_dir.with_name(export_dir.name + "_bf16")
    shutil.copytree(export_dir, out)
    export_mod.to_torchscript(eager, crop, bf16=True).save(str(out / export_mod.MODEL_FILE))
    return out


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def served(
    export_dir: Path, eager: torch.nn.Module, photos: torch.Tensor, mode: str, precision: str = "fp32"
) -> dict:
    """The handler's model under ``mode`` and ``precision``, its log lines, and how it agrees
    with eager (within BF16_RTOL for the bf16 copy)."""
    records = Records()
    logging.getLogger("handlers.optimize").addHandler(records)
    logging.getLogger("handlers.optimize").setLevel(logging.INFO)
    try:
        ctx = make_context(export_dir, 1)
        ctx.model_yaml_config["handler"]["optimize"] = mode
        ctx.model_yaml_config["handler"]["precision"] = precision
        handler = ImageClassifier()
        handler.initialize(ctx)
    finally:
        logging.getLogger("handlers.optimize").removeHandler(records)
    with torch.inference_mode():
        agreement = compare(handler.model(photos), eager(photos), BF16_RTOL if precision == "bf16" else RTOL)
    # bf16 is judged as the export's gate judges it on photos: the decisive answers keep their class.
    ok = keeps_decisive_answers(agreement) if precision == "bf16" else agreement.ok
    return {
        "model": type(handler.model).__name__,
        "precision": handler.precision,
        "log": records.lines,
        "agreement": str(agreement),
        "ok": ok,
        "relative": agreement.relative,
    }


def announce_onednn_isa() -> None:
    """Make oneDNN print its verbose header, which names the instruction set it dispatches
    to ("onednn_verbose,...,cpu,isa:..."), on stdout, where this process's parent reads it."""
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON), torch.no_grad():
        torch.nn.Conv2d(64, 64, 3)(torch.randn(8, 64, 56, 56))  # large enough for oneDNN


def main(out: Path) -> None:
    torch.set_num_threads(1)
    announce_onednn_isa()
    result = {"aten": torch.backends.cpu.get_cpu_capability(), "archs": {}}
    for arch in (*ARCHS, *PRETRAINED):
        photos = photo_batch(get_spec(arch).eval_preset_for(pretrained=arch in PRETRAINED))
        export_dir, eager, exported = export(arch, out, photos)
        result["archs"][arch] = {
            "export": exported,
            **{mode: served(export_dir, eager, photos, mode) for mode in ("onednn", "jit")},
            # the export's bf16 copy, native or emulated by these kernels
            "onednn_bf16": served(
                with_bf16_copy(export_dir, eager, photos.shape[-1]), eager, photos, "onednn", "bf16"
            ),
        }
    sys.stdout.flush()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
