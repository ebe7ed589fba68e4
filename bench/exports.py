"""The benchmark's exports and archives, under its own folder (build/bench by default).

A model's export comes from export/<name>/ when `make export` made one, otherwise from
a randomly initialised network of the same architecture (speed does not depend on the
weights' values), so `make bench` does not need training; a pretrained model
(imagenet_dogs) is exported for real instead, as `make export` would. Either way the benchmark
writes its own model-config.yaml with the server settings under test, for the handler
measured: the project's base handler (handlers/image_classifier.py), which the other
contestants are compared with, or the dog app's (handlers/dog_breeds.py).

The dog app's stand-in is a random ResNet50 beside the real, pretrained EfficientNet-Lite0
dog detector, as training/export/torchscript.py builds the deployed dog_breeds model: the same two
networks, so the same forward cost, and a detector whose answers on real photos are
real, so that each photo takes the handler's path it takes when deployed (a dog: no face
check; anything else: the face check).

An int8 export (training/export/torchscript.py --quantize int8, e.g. `make bench-int8`) keeps its
quantized engine; the built-in handler's archive then sets the same engine before
loading, so both handlers run the same int8 kernels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from handlers.preset import EvalPreset
from serving.archive import archiver, build_archive, handler_of
from training.export import pretrained
from training.export import torchscript as export_mod

# Served name -> architecture and classes of its random stand-in.
MODELS = {"dog_breeds": ("resnet50", 133), "flying_objects": ("mobilenet_v2", 4)}
BUILTIN_SUFFIX = "_builtin"
# TorchServe's built-in ImageClassifier answers a fixed top 5: on a model with fewer
# classes torch.topk fails on every request; an int8 model needs its quantized engine
# set before loading. Such models get this subclass; everything else (decoding,
# transform, batching) is the built-in's.
BUILTIN_SUBCLASS = '''"""TorchServe's built-in image_classifier handler: {what}."""
import torch
from ts.torch_handler.image_classifier import ImageClassifier


class BuiltinAdjusted(ImageClassifier):
    topk = {k}
{initialize}'''
SET_ENGINE = """
    def initialize(self, context):
        torch.backends.quantized.engine = {engine!r}
        super().initialize(context)
"""


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def random_export(name: str, out: Path, dog_gate: bool = False) -> None:
    """model.pt and index_to_name.json of a randomly initialised network; with
    ``dog_gate``, beside the pretrained dog detector that the dog app's export adds."""
    import torch

    from models.zoo import get_model

    arch, classes = MODELS[name]
    torch.manual_seed(0)
    model = get_model(arch, classes, weights=None).eval()
    if dog_gate:
        ckpt = {"eval_preset": EvalPreset().to_dict(), "model": arch}
        model = export_mod.with_dog_gate(model, ckpt, export_mod.DEFAULT_DOG_GATE).eval()
    out.mkdir(parents=True, exist_ok=True)
    # with its bf16 copy, as the export writes by default (ungated: random weights)
    export_mod.to_torchscript(model, EvalPreset.crop_size, bf16=True).save(str(out / export_mod.MODEL_FILE))
    labels = {str(i): f"class_{i:03d}" for i in range(classes)}
    (out / export_mod.LABELS_FILE).write_text(json.dumps(labels, indent=1) + "\n")


def bench_config(
    handler: dict,
    arch: str,
    classes: int,
    settings: dict,
    export_args: list[str],
    handler_name: str = "image_classifier",
) -> dict:
    """model-config.yaml for the settings under test, written by training/export/torchscript.py's own
    model_config (the handler's speed settings at their export defaults unless
    ``export_args`` say otherwise, e.g. ["--jpeg-draft", "0"]), for handlers/<handler_name>.py."""
    ckpt = {"eval_preset": EvalPreset.from_dict(handler).to_dict(), "num_classes": classes, "model": arch}
    a = export_mod.parse_args(
        [
            "--checkpoint",
            "-",
            "--out",
            "-",
            "--handler",
            handler_name,
            "--workers",
            str(settings["workers"]),
            "--threads",
            str(settings["threads"]),
            "--batch-size",
            str(settings["batch_size"]),
            "--max-batch-delay",
            str(settings["max_batch_delay"]),
            "--top-k",
            str(handler.get("top_k", 5)),
            *export_args,
        ]
    )
    return export_mod.model_config(ckpt, a)


def has_bf16_copy(model_pt: Path) -> bool:
    import torch

    from handlers.precision import BF16_METHOD

    return hasattr(torch.jit.load(str(model_pt)), BF16_METHOD)


def usable(src: Path, handler_name: str) -> bool:
    """Whether the export ``src`` can be served by handlers/<handler_name>.py: the dog app's
    handler needs the dog detector that only a dog_breeds export carries."""
    if not (src / export_mod.MODEL_FILE).is_file():
        return False
    return handler_name != "dog_breeds" or handler_of(src).stem == "dog_breeds"


def prepare_export(
    name: str,
    exports: Path,
    work: Path,
    settings: dict,
    export_args: list[str] = (),
    handler_name: str = "image_classifier",
    served_name: str | None = None,
) -> dict:
    """work/exports/<served_name>/ (default: ``name``) with the benchmark's model-config.yaml
    for handlers/<handler_name>.py, from export/<name>/; returns what it holds."""
    out = work / "exports" / (served_name or name)
    src = exports / name
    dog_gate = handler_name == "dog_breeds"
    if name in pretrained.CLASSES and not usable(src, handler_name):
        src = work / "pretrained" / name
        if not usable(src, handler_name):  # needs no training: the real one, written here
            print(f"  {name}: no usable {exports / name}/model.pt; exporting it to {src}", flush=True)
            pretrained.write_export(name, src.parent)
    if usable(src, handler_name):
        out.mkdir(parents=True, exist_ok=True)
        for f in (export_mod.MODEL_FILE, export_mod.LABELS_FILE):
            _link_or_copy(src / f, out / f)
        (out / "random.stamp").unlink(missing_ok=True)
        handler = (yaml.safe_load((src / export_mod.CONFIG_FILE).read_text()) or {}).get("handler", {})
        arch = handler.get("model", "?")
        origin = f"{src}/ ({'pretrained' if name in pretrained.CLASSES else 'trained'} export)"
    else:
        arch, _ = MODELS[name]
        origin = f"random {arch}, {MODELS[name][1]} classes" + (
            f", beside the pretrained {export_mod.DEFAULT_DOG_GATE} dog detector" if dog_gate else ""
        )
        if not (out / "random.stamp").exists():
            print(f"  {name}: no usable {src}/model.pt; exporting a {origin}", flush=True)
            random_export(name, out, dog_gate)
            (out / "random.stamp").write_text("random weights\n")
        handler = {}
    classes = len(json.loads((out / export_mod.LABELS_FILE).read_text()))
    cfg = bench_config(handler, arch, classes, settings, list(export_args), handler_name)
    if handler.get("quantized_engine"):  # the model file is int8: its engine comes with it
        cfg["handler"]["quantized_engine"] = handler["quantized_engine"]
        cfg["handler"]["precision"] = "fp32"
        origin += f", int8 ({handler['quantized_engine']})"
    if cfg["handler"].get("precision") == "bf16" and not has_bf16_copy(out / export_mod.MODEL_FILE):
        origin += ", no bf16 copy in model.pt: runs fp32"
    (out / export_mod.CONFIG_FILE).write_text(
        "# Written by bench/exports.py (training.export.model_config) for the serving benchmark.\n"
        + yaml.safe_dump(cfg, sort_keys=False)
    )
    return {
        "export": str(out),
        "origin": origin,
        "architecture": arch,
        "classes": classes,
        "model_config": cfg,
    }


def build_archives(name: str, export: Path, store: Path) -> dict:
    """<name>.mar (the project's handler) and <name>_builtin.mar (TorchServe's built-in
    image_classifier handler, same model.pt and labels, no model-config.yaml)."""
    build_archive(export, name, store)
    classes = len(json.loads((export / export_mod.LABELS_FILE).read_text()))
    cfg = yaml.safe_load((export / export_mod.CONFIG_FILE).read_text()) or {}
    engine = cfg.get("handler", {}).get("quantized_engine")
    builtin = name + BUILTIN_SUFFIX
    with tempfile.TemporaryDirectory() as stage:
        handler, note = "image_classifier", "image_classifier (built-in)"
        changes = (
            [f"topk={classes} (its fixed top 5 fails on {classes} classes)"] if classes < 5 else []
        ) + ([f"quantized engine {engine} set before loading (int8 model)"] if engine else [])
        if changes:
            handler = str(Path(stage) / "builtin_adjusted.py")
            Path(handler).write_text(
                BUILTIN_SUBCLASS.format(
                    k=min(classes, 5),
                    what="; ".join(changes),
                    initialize=SET_ENGINE.format(engine=engine) if engine else "",
                )
            )
            note = "image_classifier (built-in) with " + "; ".join(changes)
        subprocess.run(
            [
                archiver(),
                "--model-name",
                builtin,
                "--version",
                "1.0",
                "--serialized-file",
                str(export / export_mod.MODEL_FILE),
                "--handler",
                handler,
                "--extra-files",
                str(export / export_mod.LABELS_FILE),
                "--export-path",
                str(store),
                "--force",
            ],
            check=True,
        )
    return {"custom": f"{name}.mar", "builtin": f"{builtin}.mar", "builtin_handler": note}
