"""Train a registered model on an ImageFolder dataset and keep the best checkpoint.

    python -m training.train --model resnet50 --data data/demo --out runs/dog_breeds

Prints per-epoch train/valid loss and accuracy, keeps the checkpoint with the
lowest validation loss (``best.pt``), then reports ``Test Loss`` and
``Test Accuracy`` of that checkpoint. The checkpoint describes itself: model
name and options, class names, preprocessing and the training arguments.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

from models.presets import EvalPreset
from models.registry import get_model, get_spec, list_models
from models.weights import WeightsUnavailable
from training.data import load_splits, loader
from training.progress import Progress

OPTIMIZERS = {
    "sgd": lambda params, a: torch.optim.SGD(params, lr=a.lr, momentum=a.momentum,
                                             weight_decay=a.weight_decay),
    "adam": lambda params, a: torch.optim.Adam(params, lr=a.lr, weight_decay=a.weight_decay),
}


def class_logits(out):
    """The class logits of a model's output (models with an ImageNet head return a pair)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def train_one_epoch(model, data, criterion, optimizer, device, label="train") -> dict:
    """One pass over ``data``; returns mean loss and accuracy."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    progress = Progress(len(data), label)
    for i, (x, y) in enumerate(data, 1):
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        out = class_logits(model(x))
        loss = criterion(out, y)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
        progress.update(i, loss=loss_sum / seen)
    return {"loss": loss_sum / seen, "acc": correct / seen, "correct": correct, "total": seen}


@torch.inference_mode()
def evaluate(model, data, criterion, device) -> dict:
    """Mean loss and accuracy of ``model`` over ``data``."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in data:
        x, y = x.to(device), y.to(device)
        out = class_logits(model(x))
        loss_sum += criterion(out, y).item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
    return {"loss": loss_sum / seen, "acc": correct / seen, "correct": correct, "total": seen}


def model_options(a: argparse.Namespace) -> dict:
    """Builder keywords that shape the network (saved in the checkpoint to rebuild it)."""
    opts = {}
    if a.unfreeze_layer3:
        opts["unfreeze_layer3"] = True
    if a.unfreeze_blocks:
        opts["unfreeze_blocks"] = a.unfreeze_blocks
    if a.imagenet_head:
        opts["imagenet_head"] = True
    return opts


def checkpoint(model, a, classes, eval_preset, epoch, valid) -> dict:
    return {
        "model": a.model,
        "model_options": model_options(a),
        "num_classes": len(classes),
        "classes": list(classes),
        "eval_preset": eval_preset.to_dict(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "epoch": epoch,
        "valid": valid,
        "state_dict": model.state_dict(),
    }


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes (no weights download) and load its state."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = get_model(ckpt["model"], ckpt["num_classes"], **ckpt["model_options"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train an image classifier on an ImageFolder dataset.")
    p.add_argument("--model", required=True, help=f"one of: {', '.join(list_models())}")
    p.add_argument("--data", required=True, type=Path, help="dataset root with train/ valid/ test/")
    p.add_argument("--out", required=True, type=Path, help="run folder for checkpoints and metrics")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=int, default=32, help="images per training step")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd", help="optimiser")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    p.add_argument("--weights", default="DEFAULT",
                   help="torchvision weights name (DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2), "
                        "downloaded when online, or 'none' for random initialisation")
    p.add_argument("--weights-file", type=Path, help="local torchvision state dict (offline machines)")
    p.add_argument("--unfreeze-layer3", action="store_true",
                   help="resnet50: train layer3 too (the original project's second stage)")
    p.add_argument("--unfreeze-blocks", type=int, default=0,
                   help="mobilenet_v2: train the last N of its 19 feature blocks too")
    p.add_argument("--imagenet-head", action="store_true",
                   help="resnet50: keep the pretrained ImageNet classifier as a second output "
                        "(the dog-breed handler's dog detector); needs ImageNet weights")
    p.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)
    try:
        spec = get_spec(a.model)
    except ValueError as e:
        p.error(str(e))
    if a.weights.lower() == "none" or a.weights_file or not spec.pretrained:
        a.weights = None
    if a.imagenet_head and not (a.weights or a.weights_file):
        p.error("--imagenet-head needs ImageNet weights (--weights DEFAULT or --weights-file): "
                "a randomly initialised head knows no ImageNet classes")
    return a


def run(a: argparse.Namespace) -> dict:
    """Train, keep the best checkpoint by validation loss, test it; returns the test metrics."""
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = get_spec(a.model)
    eval_preset = EvalPreset()
    sets = load_splits(a.data, spec.train_preset.transform(eval_preset), eval_preset.transform())
    classes = sets["train"].classes
    print(f"{a.model}: {len(classes)} classes, "
          + ", ".join(f"{s} {len(d)}" for s, d in sets.items()) + f" images, device {device}")
    model = get_model(a.model, len(classes), weights=a.weights,
                      weights_file=a.weights_file, **model_options(a)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[a.optimizer](params, a)
    criterion = nn.CrossEntropyLoss()
    train_dl = loader(sets["train"], a.batch_size, True, a.workers)
    valid_dl = loader(sets["valid"], a.batch_size, False, a.workers)
    a.out.mkdir(parents=True, exist_ok=True)
    best = float("inf")
    history = []
    for epoch in range(1, a.epochs + 1):
        t0 = time.perf_counter()
        tr = train_one_epoch(model, train_dl, criterion, optimizer, device,
                             label=f"epoch {epoch}/{a.epochs}")
        va = evaluate(model, valid_dl, criterion, device)
        history.append({"epoch": epoch, "train": tr, "valid": va})
        mark = ""
        if va["loss"] < best:
            best = va["loss"]
            torch.save(checkpoint(model, a, classes, eval_preset, epoch, va), a.out / "best.pt")
            mark = "  (saved best.pt)"
        print(f"Epoch {epoch}: train loss {tr['loss']:.4f} acc {tr['acc']:.1%} | "
              f"valid loss {va['loss']:.4f} acc {va['acc']:.1%} | "
              f"{time.perf_counter() - t0:.0f}s{mark}", flush=True)
    model, ckpt = load_checkpoint(a.out / "best.pt")
    te = evaluate(model.to(device), loader(sets["test"], a.batch_size, False, a.workers),
                  criterion, device)
    print(f"Test Loss: {te['loss']:.6f}")
    print(f"Test Accuracy: {te['acc']:.0%} ({te['correct']}/{te['total']})")
    metrics = {"model": a.model, "best_epoch": ckpt["epoch"], "test": te, "history": history}
    (a.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return te


def main(argv=None):
    a = parse_args(argv)
    try:
        run(a)
    except (WeightsUnavailable, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
