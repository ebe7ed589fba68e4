"""A checkpoint for a pretrained model that needs no training, in the format export reads.

    python -m training.export.pretrained --model imagenet_dogs --out runs/imagenet_dogs

Writes ``best.pt`` (the self-describing checkpoint training.fit.train writes: model name,
classes, eval preprocessing, weights) and ``metrics.json`` (no test on your data: the
model's classes are ImageNet's), so that ``training.export`` and the rest of the
pipeline treat it as any trained run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models import imagenet
from models.zoo import get_model, get_spec
from training.fit import train as train_mod
from training.fit.checkpoint import checkpoint, save_atomic

# The pretrained models this command knows, with their class names and the handler that serves them.
CLASSES = {"imagenet_dogs": imagenet.dog_breeds}
HANDLERS = {"imagenet_dogs": "dog_breeds"}


def write(model_name: str, out: Path) -> Path:
    classes = CLASSES[model_name]()
    a = train_mod.parse_args(
        ["--model", model_name, "--data", "-", "--out", str(out), "--weights", "DEFAULT"]
    )
    model = get_model(model_name, len(classes), weights=a.weights).eval()
    preset = get_spec(model_name).eval_preset_for(pretrained=True)
    out.mkdir(parents=True, exist_ok=True)
    save_atomic(checkpoint(model, a, classes, preset, epoch=0, valid=None), out / "best.pt")
    (out / "metrics.json").write_text(
        json.dumps({"model": model_name, "pretrained": True, "classes": len(classes)}, indent=2) + "\n"
    )
    print(f"{model_name}: {len(classes)} classes, pretrained weights, checkpoint {out / 'best.pt'}")
    return out / "best.pt"


def write_export(model_name: str, work: Path) -> Path:
    """The checkpoint and its export, as `make export` writes them: ``work/<model_name>/``
    (model.pt, labels, model-config.yaml), the checkpoint in ``work/<model_name>_run/``."""
    from training.export import torchscript

    checkpoint = write(model_name, work / f"{model_name}_run")
    out = work / model_name
    a = torchscript.parse_args(
        ["--checkpoint", str(checkpoint), "--out", str(out), "--handler", HANDLERS[model_name]]
    )
    return torchscript.export(checkpoint, out, a)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Write the checkpoint of a pretrained model that needs no training."
    )
    p.add_argument("--model", required=True, choices=sorted(CLASSES), help="pretrained model")
    p.add_argument("--out", required=True, type=Path, help="run folder to write best.pt into")
    a = p.parse_args(argv)
    write(a.model, a.out)


if __name__ == "__main__":
    main()
