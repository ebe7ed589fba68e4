"""Export a checkpoint for TorchServe: TorchScript, labels and model-config.yaml.

    python -m training.export --checkpoint runs/dog_breeds/best.pt --out export/dog_breeds

Writes ``model.pt`` (the traced, frozen eval-mode model), ``index_to_name.json``
(0-based, from the class folders) and ``model-config.yaml`` (TorchServe worker and
batching settings plus a ``handler:`` section with the preprocessing and top-k,
which the handler reads from ``context.model_yaml_config``).

With ``--quantize int8 --calibration-data DATASET`` the model is quantised to int8 for
x86 CPUs first (training/export/quantize.py; docs/export.md says what it gains and costs); the
export then also writes ``quantization.json`` and fails, writing nothing, if test
accuracy drops by more than ``--max-accuracy-drop`` points.

The module is saved frozen but not passed through ``torch.jit.optimize_for_inference``:
with torch 2.13 such a file fails to load ("required keyword attribute 'value' is
undefined"). Optimise after loading, if at all.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import yaml

from handlers.explain import has_cam
from handlers.optimize import OPTIMIZE_MODES, Agreement, compare, onednn_sizes, tensors
from handlers.precision import PRECISIONS
from handlers.preset import EvalPreset
from handlers.settings import SETTINGS, HandlerSettings, ServerSettings
from models import imagenet
from models.zoo import get_model, get_spec
from training.export import bf16, gate, methods, quantize
from training.fit.checkpoint import load_checkpoint

MODEL_FILE = "model.pt"
# The dog detector a dog-breed model without ImageNet classes of its own is exported with:
# the one pretrained ImageNet network that installs without a download.
DEFAULT_DOG_GATE = "efficientnet_lite0"
LABELS_FILE = "index_to_name.json"
CONFIG_FILE = "model-config.yaml"
QUANTIZATION_FILE = "quantization.json"


def to_torchscript(model: torch.nn.Module, crop: int = EvalPreset.crop_size, bf16: bool = False):
    """The eval-mode model traced on a batch of two crops, then frozen; with its bf16 copy
    when ``bf16``, and with the methods of its class activation maps where the network has
    them (training/export/methods.py).

    Traced rather than scripted: these networks have no data-dependent control flow,
    and torch.jit.script compiles every submodule's Python source, which with torch 2.13
    fails now and then ("builtin cannot be used as a value" in Conv2d._conv_forward):
    the compiler finds builtins in a table keyed by id(), which keeps the ids of
    operators that torch.library replaced when torch.ao.quantization registered its
    own, so a module attribute allocated at a freed operator's address is taken for it.
    Tracing records the operators that run and never consults that table.
    """
    return methods.to_torchscript(model, crop, bf16=bf16)


def handler_settings(a: argparse.Namespace, ckpt: dict) -> HandlerSettings:
    """The handler's settings from the flags (handlers/settings.py documents each); the
    model's registry entry gives the oneDNN Graph batch sizes unless the flags do."""
    batches = a.onednn_batches or get_spec(ckpt["model"]).onednn_batches
    return SETTINGS[a.handler](
        top_k=min(a.top_k, ckpt["num_classes"]),
        threads=a.threads,
        jpeg_draft=a.jpeg_draft,
        optimize=a.optimize,
        half=a.half,
        gpu_decode=a.gpu_decode,
        onednn_batches=tuple(onednn_sizes(list(batches), a.batch_size)) if batches else None,
        quantized_engine=a.quantize_engine if a.quantize == "int8" else None,
        precision=a.precision,
    )


def model_config(ckpt: dict, a: argparse.Namespace) -> dict:
    """model-config.yaml: TorchServe's per-model keys, and the handler's section with the
    preprocessing and the handler's settings."""
    server = ServerSettings(a.workers, a.batch_size, a.max_batch_delay, a.response_timeout)
    return {
        **server.to_config(),
        "handler": {
            "name": a.handler,
            **ckpt["eval_preset"],
            "model": ckpt["model"],
            **handler_settings(a, ckpt).to_config(),
        },
    }


def check_roundtrip(eager: torch.nn.Module, path: Path, crop: int) -> Agreement:
    """Load the saved file back and compare it with the eager model on a batch of three
    (not the traced batch size, so a batch dimension frozen into the trace shows)."""
    x = torch.randn(3, 3, crop, crop, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        agreement = compare(torch.jit.load(str(path))(x), eager(x))
    if not agreement.ok:
        raise RuntimeError(f"the TorchScript file does not compute what the eager model does: {agreement}")
    return agreement


def quantized(model: torch.nn.Module, ckpt: dict, a: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The int8 model and its comparison with fp32; SystemExit if it loses too much accuracy."""
    preset = EvalPreset.from_dict(ckpt["eval_preset"])
    calibration = quantize.calibration_set(a.data, preset, ckpt["classes"], a.calibration_images)
    print(
        f"int8 ({a.quantize_engine}): calibrating on {len(calibration)} images of {a.data}/train/",
        flush=True,
    )
    int8 = quantize.quantize_int8(model, calibration, a.quantize_engine)
    result = gate.compare(model, int8, gate.dataset(a.data, "test", preset, ckpt["classes"]), "test")
    print(f"int8 against fp32 on {result}", flush=True)
    gate.refuse(
        gate.loss(result, a.max_accuracy_drop, "--max-accuracy-drop"),
        "export without --quantize, or try --quantize-engine / more --calibration-images",
    )
    report = {
        "engine": a.quantize_engine,
        "calibration_data": str(a.data),
        "calibration_images": len(calibration),
        **result.to_dict(),
    }
    return int8, report


def bf16_gate(scripted, ckpt: dict, a: argparse.Namespace) -> tuple[dict, str | None]:
    """The bf16 copy against fp32 (training/export/bf16.py): on the dataset's valid/ split
    when ``--data`` is given, else on real photos without labels. Returns the numbers and
    what bf16 loses (None when it passes)."""
    preset = EvalPreset.from_dict(ckpt["eval_preset"])
    if a.data is not None:
        result = bf16.on_split(scripted, a.data, preset, ckpt["classes"])
        print(f"bf16 against fp32 on {result}", flush=True)
        report = {"data": str(a.data), **result.to_dict()}
        return report, gate.loss(result, a.max_bf16_drop, "--max-bf16-drop")
    photos = bf16.on_photos(scripted, preset)
    print(
        f"bf16 against fp32 on {photos['images']} real photos (no labels: give --data for "
        f"accuracy): same top-1 on {photos['agree']}; outputs {photos['outputs']}",
        flush=True,
    )
    lost = f"bf16 changes answers that fp32 gives decisively ({photos['outputs']})"
    return photos, None if photos["ok"] else lost


def with_bf16(model: torch.nn.Module, ckpt: dict, a: argparse.Namespace):
    """(TorchScript module, bf16.json's content or None) for ``--precision``: with the bf16
    copy when it passes its gate. A copy that fails stops ``--precision bf16`` (SystemExit,
    nothing written); under ``auto`` it is left out, the export saying so, and the model
    is served in fp32."""
    crop = ckpt["eval_preset"]["crop_size"]
    if a.precision == "fp32":
        return to_torchscript(model, crop), None
    scripted = to_torchscript(model, crop, bf16=True)
    report, lost = bf16_gate(scripted, ckpt, a)
    if lost is None:
        return scripted, {**report, "served": True}
    if a.precision == "bf16":
        gate.refuse(lost, "export with --precision auto or fp32 to serve fp32")
    print(f"precision auto: no bf16 copy, {lost}; the model is served in fp32", flush=True)
    a.precision = "fp32"
    return to_torchscript(model, crop), {**report, "served": False, "why_not": lost}


def display_name(folder: str) -> str:
    """A class folder's name as people read it: the original dog dataset's numbered
    folders ("001.Affenpinscher", "002.Afghan_hound") read "Affenpinscher", "Afghan hound";
    other names stay as they are."""
    m = re.fullmatch(r"\d+\.(.+)", folder)
    return m.group(1).replace("_", " ") if m else folder


def with_dog_gate(model: torch.nn.Module, ckpt: dict, gate_name: str) -> torch.nn.Module:
    """The dog-breed model with ImageNet's classes as its second output: its own (an
    ImageNet head), or those of the pretrained ``gate_name`` network beside it."""
    crop = ckpt["eval_preset"]["crop_size"]
    with torch.inference_mode():
        if len(tensors(model(torch.zeros(1, 3, crop, crop)))) == 2:
            return model
    gate = get_model(gate_name, len(imagenet.categories()), weights="DEFAULT").eval()
    print(f"dog detector: {gate_name}'s ImageNet classes, beside {ckpt['model']}", flush=True)
    return imagenet.WithImageNetGate(
        model,
        gate,
        EvalPreset.from_dict(ckpt["eval_preset"]),
        get_spec(gate_name).eval_preset_for(pretrained=True),
    )


def export(checkpoint: Path, out: Path, a: argparse.Namespace) -> Path:
    model, ckpt = load_checkpoint(checkpoint)
    report = None
    if a.quantize == "int8":
        model, report = quantized(model, ckpt, a)
    if a.handler == "dog_breeds":
        model = with_dog_gate(model, ckpt, a.dog_gate)
    crop = ckpt["eval_preset"]["crop_size"]
    scripted, bf16_report = with_bf16(model, ckpt, a)
    out.mkdir(parents=True, exist_ok=True)
    scripted.save(str(out / MODEL_FILE))
    agreement = check_roundtrip(model, out / MODEL_FILE, crop)
    for name, content in ((QUANTIZATION_FILE, report), (bf16.REPORT_FILE, bf16_report)):
        (out / name).unlink(missing_ok=True)
        if content:
            (out / name).write_text(json.dumps(content, indent=2) + "\n")
    labels = {str(i): display_name(name) for i, name in enumerate(ckpt["classes"])}
    (out / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
    header = (
        f"# TorchServe settings for {ckpt['model']}, written by training/export/torchscript.py from "
        f"{checkpoint}.\n# Worker/batching keys are TorchServe's; 'handler' is read by "
        f"handlers/{a.handler}.py.\n"
    )
    (out / CONFIG_FILE).write_text(header + yaml.safe_dump(model_config(ckpt, a), sort_keys=False))
    print(
        f"exported {ckpt['model']} ({ckpt['num_classes']} classes"
        f"{', int8' if report else ''}{', with a bf16 copy' if a.precision != 'fp32' else ''}"
        f"{', with the maps of /explanations' if has_cam(scripted) else ''}) "
        f"to {out}/ "
        f"[TorchScript against eager: {agreement}]"
    )
    return out


def add_server_flags(p: argparse.ArgumentParser, workers: int | None = ServerSettings.workers) -> None:
    """How TorchServe runs a model: the export writes them into model-config.yaml, and the
    benchmark serves with them (its ``workers`` default: None, to fill the cores)."""
    p.add_argument("--batch-size", type=int, default=ServerSettings.batch_size, help="TorchServe batchSize")
    p.add_argument(
        "--max-batch-delay",
        type=int,
        default=ServerSettings.max_batch_delay,
        help="TorchServe maxBatchDelay in ms: how long to wait to fill a batch",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=workers,
        help="TorchServe min/max workers (workers x threads <= cores)"
        + ("" if workers else "; default: cores / --threads"),
    )
    p.add_argument(
        "--threads",
        type=int,
        default=HandlerSettings.threads,
        help="torch threads per worker (OMP_NUM_THREADS); workers x threads should not exceed the cores",
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.export", description="Export a training checkpoint for TorchServe."
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="best.pt from training.fit.train")
    p.add_argument("--out", required=True, type=Path, help="folder to write the export into")
    add_server_flags(p)
    p.add_argument(
        "--response-timeout",
        type=int,
        default=ServerSettings.response_timeout,
        help="TorchServe responseTimeout (s)",
    )
    p.add_argument("--top-k", type=int, default=HandlerSettings.top_k, help="labels returned per image")
    p.add_argument(
        "--jpeg-draft",
        type=float,
        default=HandlerSettings.jpeg_draft,
        help="decode large JPEGs at 1/2-1/8 scale keeping the short side >= this "
        "x resize_size (0: always full decode)",
    )
    p.add_argument(
        "--optimize",
        choices=OPTIMIZE_MODES,
        default=HandlerSettings.optimize,
        help="how the handler optimises the model it loads: oneDNN Graph fusion "
        "per batch size (CPU workers; jit on a GPU), "
        "torch.jit.optimize_for_inference, or none",
    )
    p.add_argument(
        "--no-optimize",
        dest="optimize",
        action="store_const",
        const="none",
        help="the same as --optimize none",
    )
    p.add_argument(
        "--onednn-batches",
        type=int,
        nargs="+",
        metavar="N",
        help="--optimize onednn: the batch sizes to compile a model copy for, "
        "including 1 (default: 1, 2, 4, ... up to --batch-size); fewer "
        "copies, less memory",
    )
    p.add_argument(
        "--half", action="store_true", help="CUDA workers: forward pass in fp16 (autocast); ignored on CPU"
    )
    p.add_argument(
        "--gpu-decode",
        action="store_true",
        help="CUDA workers: decode JPEGs with nvJPEG and preprocess on the GPU",
    )
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: quantise for x86 CPUs (needs --calibration-data); see training/export/quantize.py",
    )
    p.add_argument(
        "--data",
        "--calibration-data",
        dest="data",
        type=Path,
        help="dataset root (train/ valid/ test/) the model was trained on: the bf16 gate "
        "reads valid/; int8 ranges come from train/, its accuracy check from test/",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=HandlerSettings.precision,
        help="the forward pass's number format on CPU workers: auto (bf16 where the CPU has "
        "bf16 units, else fp32), fp32, or bf16; auto and bf16 add a bfloat16 copy to "
        "model.pt, gated for accuracy first (training/export/bf16.py)",
    )
    p.add_argument(
        "--max-bf16-drop",
        type=float,
        default=0.5,
        help="refuse bf16 if its valid top-1 accuracy is more than this many points below fp32",
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=256,
        help="training images that calibrate the int8 activation ranges",
    )
    p.add_argument(
        "--quantize-engine",
        choices=quantize.ENGINES,
        default=quantize.DEFAULT_ENGINE,
        help="torch.backends.quantized engine the int8 model is made for",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=1.0,
        help="fail if int8 test top-1 accuracy is more than this many points below fp32",
    )
    p.add_argument(
        "--dog-gate",
        default=DEFAULT_DOG_GATE,
        help="--handler dog_breeds: the pretrained ImageNet network that detects dogs "
        "for a model without ImageNet classes of its own",
    )
    p.add_argument(
        "--handler",
        choices=["image_classifier", "dog_breeds"],
        default="image_classifier",
        help="handlers/<name>.py serves the model: dog_breeds adds dog/human/none",
    )
    a = p.parse_args(argv)
    if a.quantize == "int8" and a.data is None:
        p.error("--quantize int8 needs --calibration-data (the dataset the model was trained on)")
    if a.quantize == "int8":
        if a.precision == "bf16":
            p.error("--quantize int8 and --precision bf16 exclude each other")
        a.precision = "fp32"  # an int8 model has no bf16 copy
    if a.onednn_batches:
        try:  # the handler's own rule for model-config.yaml's onednn_batches
            onednn_sizes(a.onednn_batches, a.batch_size)
        except ValueError:
            p.error("--onednn-batches: positive batch sizes including 1 (any batch is cut into them)")
    return a


def main(argv=None):
    a = parse_args(argv)
    export(a.checkpoint, a.out, a)


if __name__ == "__main__":
    main()
