"""The benchmark's exports and archives, under its own folder (build/bench by default).

A model's export comes from export/<name>/ when `make export` made one, otherwise from
a randomly initialised network of the same architecture (speed does not depend on the
weights' values), so `make bench` does not need training. Either way the benchmark
writes its own model-config.yaml with the server settings under test and the project's
base handler (handlers/image_classifier.py): the dog-breed handler's face detection is
application logic that the other contestants do not have.

An int8 export (training/export.py --quantize int8, e.g. `make bench-int8`) keeps its
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

from models.presets import EvalPreset
from serving.archive import archiver, build_archive
from training import export as export_mod

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
SET_ENGINE = '''
    def initialize(self, context):
        torch.backends.quantized.engine = {engine!r}
        super().initialize(context)
'''


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def random_export(name: str, out: Path) -> None:
    """model.pt and index_to_name.json of a randomly initialised network."""
    import torch

    from models.zoo import get_model
    arch, classes = MODELS[name]
    torch.manual_seed(0)
    model = get_model(arch, classes, weights=None).eval()
    out.mkdir(parents=True, exist_ok=True)
    export_mod.to_torchscript(model).save(str(out / export_mod.MODEL_FILE))
    labels = {str(i): f"class_{i:03d}" for i in range(classes)}
    (out / export_mod.LABELS_FILE).write_text(json.dumps(labels, indent=1) + "\n")


def bench_config(handler: dict, arch: str, classes: int, settings: dict, export_args: list[str]) -> dict:
    """model-config.yaml for the settings under test, written by training/export.py's own
    model_config (the handler's speed settings at their export defaults unless
    ``export_args`` say otherwise, e.g. ["--jpeg-draft", "0"]), for the base handler."""
    ckpt = {"eval_preset": EvalPreset.from_dict(handler).to_dict(), "num_classes": classes, "model": arch}
    a = export_mod.parse_args([
        "--checkpoint", "-", "--out", "-", "--handler", "image_classifier",
        "--workers", str(settings["workers"]), "--threads", str(settings["threads"]),
        "--batch-size", str(settings["batch_size"]),
        "--max-batch-delay", str(settings["max_batch_delay"]),
        "--top-k", str(handler.get("top_k", 5)), *export_args])
    return export_mod.model_config(ckpt, a)


def prepare_export(name: str, exports: Path, work: Path, settings: dict,
                   export_args: list[str] = ()) -> dict:
    """work/exports/<name>/ with the benchmark's model-config.yaml; returns what it holds."""
    out = work / "exports" / name
    src = exports / name
    if (src / export_mod.MODEL_FILE).is_file():
        out.mkdir(parents=True, exist_ok=True)
        for f in (export_mod.MODEL_FILE, export_mod.LABELS_FILE):
            _link_or_copy(src / f, out / f)
        (out / "random.stamp").unlink(missing_ok=True)
        handler = (yaml.safe_load((src / export_mod.CONFIG_FILE).read_text()) or {}).get("handler", {})
        arch = handler.get("model", "?")
        origin = f"{src}/ (trained export)"
    else:
        arch, _ = MODELS[name]
        if not (out / "random.stamp").exists():
            print(f"  {name}: no {src}/model.pt; exporting a randomly initialised "
                  f"{arch} ({MODELS[name][1]} classes)", flush=True)
            random_export(name, out)
            (out / "random.stamp").write_text("random weights\n")
        handler = {}
        origin = f"random {arch}, {MODELS[name][1]} classes"
    classes = len(json.loads((out / export_mod.LABELS_FILE).read_text()))
    cfg = bench_config(handler, arch, classes, settings, list(export_args))
    if handler.get("quantized_engine"):  # the model file is int8: its engine comes with it
        cfg["handler"]["quantized_engine"] = handler["quantized_engine"]
        origin += f", int8 ({handler['quantized_engine']})"
    (out / export_mod.CONFIG_FILE).write_text(
        "# Written by bench/exports.py (training.export.model_config) for the serving benchmark.\n"
        + yaml.safe_dump(cfg, sort_keys=False))
    return {"export": str(out), "origin": origin, "architecture": arch, "classes": classes,
            "model_config": cfg}


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
        changes = ([f"topk={classes} (its fixed top 5 fails on {classes} classes)"] if classes < 5 else []) \
            + ([f"quantized engine {engine} set before loading (int8 model)"] if engine else [])
        if changes:
            handler = str(Path(stage) / "builtin_adjusted.py")
            Path(handler).write_text(BUILTIN_SUBCLASS.format(
                k=min(classes, 5), what="; ".join(changes),
                initialize=SET_ENGINE.format(engine=engine) if engine else ""))
            note = "image_classifier (built-in) with " + "; ".join(changes)
        subprocess.run([archiver(), "--model-name", builtin, "--version", "1.0",
                        "--serialized-file", str(export / export_mod.MODEL_FILE),
                        "--handler", handler,
                        "--extra-files", str(export / export_mod.LABELS_FILE),
                        "--export-path", str(store), "--force"], check=True)
    return {"custom": f"{name}.mar", "builtin": f"{builtin}.mar", "builtin_handler": note}
