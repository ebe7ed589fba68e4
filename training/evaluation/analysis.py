"""Analysis of a training run, written as files into its run folder.

What the student notebooks showed, made a step of its own: loss and accuracy
curves, a confusion matrix, per-class precision/recall/F1 (CSV, markdown, bar
chart) and a grid of misclassified images. The trainer calls ``analyse()`` at
the end of training; the CLI re-creates the files afterwards from a run folder:

    python -m training.evaluation.analysis --run runs/dog_breeds --data data/demo --split test

Figures use matplotlib's object API (training/figures.py), not pyplot.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.colors import PowerNorm
from PIL import Image
from torch import nn
from torch.utils.data import SequentialSampler

from handlers.decode import BadImage, open_image
from handlers.preset import EvalPreset
from training.data.datasets import image_folder, loader
from training.evaluation.evaluate import evaluate
from training.figures import Figure, save_png
from training.fit.checkpoint import load_checkpoint
from training.fit.distributed import Dist

# The trainer imports this module only inside a function, so this is not circular.

# Cell counts are written into the confusion matrix only up to this many classes.
CELL_NUMBERS_MAX = 20
# Class names label the confusion matrix axes up to this many classes (133 dog breeds
# still fit at a small font); beyond it the axes show every k-th class index.
TICK_NAMES_MAX = 150
THUMB_PX = 160
COLUMNS = ("class", "precision", "recall", "f1", "support")


@dataclass
class Predictions:
    """One entry per image, in dataset order."""

    y_true: list[int]
    y_pred: list[int]
    confidence: list[float]  # softmax probability of the predicted class
    paths: list[str]

    def wrong(self) -> list[int]:
        """Indices of the misclassified images."""
        return [i for i, (t, p) in enumerate(zip(self.y_true, self.y_pred)) if t != p]


# ---------------------------------------------------------------- predictions


def from_evaluation(result: dict, samples) -> Predictions:
    """The Predictions of ``training.evaluation.evaluate.evaluate(..., collect=True)`` over a dataset
    read in order; ``samples`` is its ImageFolder's (path, label) list."""
    y_true, y_pred, conf = result["predictions"]
    if len(y_true) != len(samples) or any(t != s[1] for t, s in zip(y_true, samples)):
        raise ValueError("labels from the loader do not match dataset.samples in order")
    return Predictions(y_true, y_pred, conf, [str(s[0]) for s in samples])


def predict(model, data_loader, device) -> Predictions:
    """Run ``model`` in eval and inference mode over an ImageFolder loader (shuffle=False).

    Paths come from ``data_loader.dataset.samples``, which is only in step with
    the batches when the loader does not shuffle; a shuffling loader is refused.
    The model's train/eval mode is restored afterwards.
    """
    if not isinstance(data_loader.sampler, SequentialSampler):
        raise ValueError(
            "predict() needs a loader built with shuffle=False: "
            "image paths are matched to predictions by position"
        )
    was_training = model.training
    try:
        result = evaluate(
            model, data_loader, nn.CrossEntropyLoss(), Dist(device=torch.device(device)), collect=True
        )
    finally:
        model.train(was_training)
    return from_evaluation(result, data_loader.dataset.samples)


# -------------------------------------------------------------------- metrics


def confusion_matrix(y_true, y_pred, num_classes: int) -> torch.Tensor:
    """Counts with rows = true class, columns = predicted class (int64)."""
    t = torch.as_tensor(list(y_true), dtype=torch.int64)
    p = torch.as_tensor(list(y_pred), dtype=torch.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.numel()} labels but y_pred {p.numel()}")
    for name, v in (("y_true", t), ("y_pred", p)):
        if v.numel() and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} has labels outside 0..{num_classes - 1}")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _ratio(num: float, den: float) -> float:
    # 0/0 is defined as 0.0: a class never predicted has precision 0, an empty class recall 0.
    return num / den if den else 0.0


def per_class_report(cm: torch.Tensor, classes) -> list[dict]:
    """Precision, recall, F1 and support per class, in class order.

    Any 0/0 (a class never predicted, a class with no images, or P = R = 0 in F1)
    is reported as 0.0, as scikit-learn does with ``zero_division=0``.
    """
    if cm.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix {tuple(cm.shape)} does not fit {len(classes)} classes")
    tp = cm.diagonal().tolist()
    predicted = cm.sum(0).tolist()
    support = cm.sum(1).tolist()
    rows = []
    for name, t, n_pred, n_true in zip(classes, tp, predicted, support):
        precision, recall = _ratio(t, n_pred), _ratio(t, n_true)
        rows.append(
            {
                "class": name,
                "precision": precision,
                "recall": recall,
                "f1": _ratio(2 * precision * recall, precision + recall),
                "support": n_true,
            }
        )
    return rows


def summary(cm: torch.Tensor) -> dict:
    """Accuracy and macro-averaged precision, recall, F1 (unweighted mean over all classes)."""
    rows = per_class_report(cm, [str(i) for i in range(cm.shape[0])])
    n = len(rows)
    total = int(cm.sum())
    return {
        "accuracy": _ratio(int(cm.diagonal().sum()), total),
        "macro_precision": sum(r["precision"] for r in rows) / n,
        "macro_recall": sum(r["recall"] for r in rows) / n,
        "macro_f1": sum(r["f1"] for r in rows) / n,
        "total": total,
    }


def _summary_rows(totals: dict) -> list[tuple[str, str, str, str, str]]:
    n = str(totals["total"])
    return [
        (
            "macro avg",
            f"{totals['macro_precision']:.3f}",
            f"{totals['macro_recall']:.3f}",
            f"{totals['macro_f1']:.3f}",
            n,
        ),
        ("accuracy", "", "", f"{totals['accuracy']:.3f}", n),
    ]


def _cells(rows: list[dict]) -> list[tuple[str, str, str, str, str]]:
    return [
        (r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"]))
        for r in rows
    ]


def report_table(rows: list[dict], totals: dict | None = None) -> str:
    """A fixed-width text table of ``per_class_report`` rows (plus ``summary`` lines if given)."""
    body = _cells(rows)
    tail = _summary_rows(totals) if totals else []
    width = max([len(COLUMNS[0])] + [len(r[0]) for r in body + tail])
    fmt = f"{{:<{width}}}  {{:>9}}  {{:>9}}  {{:>9}}  {{:>7}}"
    lines = [fmt.format(*COLUMNS)] + [fmt.format(*r) for r in body]
    if tail:
        lines += [""] + [fmt.format(*r) for r in tail]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    """Per-class rows only (no summary lines), full float precision, for other tools to read."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def write_markdown(rows: list[dict], totals: dict, path: Path) -> Path:
    """The per-class table and the summary lines as a markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---:|---:|---:|---:|"]
    for r in _cells(rows):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    for r in _summary_rows(totals):
        lines.append("| **" + r[0] + "** | " + " | ".join(r[1:]) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


# -------------------------------------------------------------------- figures


def _message_png(text: str, path: Path) -> Path:
    """A small PNG that only says ``text`` (so the run folder's file list stays the same)."""
    fig = Figure(figsize=(6, 1.5))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=12)
    return save_png(fig, path)


def best_epoch(history: list[dict]) -> dict:
    """The history entry with the lowest validation loss (the one best.pt was saved at)."""
    return min(history, key=lambda h: h["valid"]["loss"])


def plot_curves(history: list[dict], path) -> Path:
    """Loss and accuracy per epoch, train vs valid; the best valid-loss epoch is marked.

    A learning rate in the history (key ``lr``) is drawn on a log axis of the loss panel.
    """
    path = Path(path)
    if not history:
        return _message_png("No epochs recorded", path)
    epochs = [h["epoch"] for h in history]
    best = best_epoch(history)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, scale in ((ax_loss, "loss", 1), (ax_acc, "acc", 100)):
        for split, style in (("train", "o-"), ("valid", "s-")):
            ax.plot(epochs, [h[split][key] * scale for h in history], style, ms=4, label=split)
        ax.axvline(
            best["epoch"], color="grey", ls="--", lw=1, label=f"best valid loss (epoch {best['epoch']})"
        )
        ax.plot(best["epoch"], best["valid"][key] * scale, "*", ms=14, color="C1")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_loss.set(ylabel="loss", title="Loss")
    ax_acc.set(ylabel="accuracy (%)", title="Accuracy")
    lrs = [h.get("lr") for h in history]
    if all(lr is not None and lr > 0 for lr in lrs):
        ax_lr = ax_loss.twinx()
        ax_lr.plot(epochs, lrs, ":", color="grey", label="lr")
        ax_lr.set(yscale="log", ylabel="learning rate")
    if len(epochs) < 15:
        for ax in (ax_loss, ax_acc):
            ax.set_xticks(epochs)
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    return save_png(fig, path)


def _tick_fontsize(n: int) -> float:
    return max(5.0, min(10.0, 400 / n))


def _confusion_ticks(ax, classes, n: int) -> None:
    if n <= TICK_NAMES_MAX:
        size = _tick_fontsize(n)
        ax.set_xticks(range(n), classes, rotation=90, fontsize=size)
        ax.set_yticks(range(n), classes, fontsize=size)
        ax.set(xlabel="predicted", ylabel="true")
    else:
        step = -(-n // 40)  # about 40 index ticks
        ticks = range(0, n, step)
        ax.set_xticks(ticks, ticks, fontsize=7)
        ax.set_yticks(ticks, ticks, fontsize=7)
        ax.set(xlabel="predicted class (index)", ylabel="true class (index)")


def plot_confusion(cm: torch.Tensor, classes, path) -> Path:
    """Row-normalised confusion matrix (each row: where that class's images went).

    Counts are written in the cells up to CELL_NUMBERS_MAX classes; the figure grows
    with the number of classes and tick labels shrink, so 133 classes stay readable.
    """
    n = len(classes)
    counts = cm.to(torch.float64)
    norm = counts / counts.sum(1, keepdim=True).clamp(min=1)
    side = min(max(4.5, 0.17 * n + 2.5), 26.0)
    # Room for the longest class name, so long names do not squeeze the matrix.
    names_in = max(map(len, classes)) * _tick_fontsize(n) * 0.6 / 72 if n <= TICK_NAMES_MAX else 0.4
    fig = Figure(figsize=(side + names_in + 1.5, side + names_in + 0.6), layout="constrained")
    ax = fig.subplots()
    # A square-root colour scale, so that a single error among many classes is still visible.
    im = ax.imshow(norm.numpy(), cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    fig.colorbar(
        im, ax=ax, shrink=0.6, ticks=[0, 0.05, 0.1, 0.25, 0.5, 0.75, 1], label="fraction of the true class"
    )
    _confusion_ticks(ax, classes, n)
    if n <= CELL_NUMBERS_MAX:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if norm[i, j] > 0.4 else "black",
                    )
    total = int(cm.sum())
    acc = _ratio(int(cm.diagonal().sum()), total)
    ax.set_title(f"Confusion matrix: {n} classes, {total} images, accuracy {acc:.1%}")
    return save_png(fig, path)


def plot_per_class(rows: list[dict], path) -> Path:
    """Horizontal bars of precision, recall and F1 per class, worst F1 at the top."""
    rows = sorted(rows, key=lambda r: (r["f1"], r["class"]), reverse=True)
    n = len(rows)
    fig = Figure(figsize=(8, min(max(3.0, 0.24 * n + 1.5), 40.0)), layout="constrained")
    ax = fig.subplots()
    h = 0.27
    for k, key in enumerate(("precision", "recall", "f1")):
        ax.barh([i + (k - 1) * h for i in range(n)], [r[key] for r in rows], height=h, label=key)
    size = max(4.0, min(9.0, 500 / max(n, 1)))
    ax.set_yticks(range(n), [f"{r['class']} ({r['support']})" for r in rows], fontsize=size)
    ax.set(xlim=(0, 1.0), xlabel="score", title="Per-class scores (support in brackets)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)


def _thumbnail(path: str) -> Image.Image:
    try:
        img = open_image(path)
    except (BadImage, OSError):
        return Image.new("RGB", (THUMB_PX, THUMB_PX), (200, 200, 200))
    img.thumbnail((THUMB_PX, THUMB_PX))
    return img


def plot_misclassified(preds: Predictions, classes, path, per_class: int = 4, max_rows: int = 50) -> Path:
    """A grid of misclassified images: one row per true class with errors, most confident first.

    Each image is captioned "true: X / pred: Y (p=0.87)". Beyond ``max_rows`` classes
    with errors, the classes with most errors are shown (the title says so), so a
    133-class run stays a viewable image. Without errors, a PNG says so.
    """
    path = Path(path)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in preds.wrong():
        by_class[preds.y_true[i]].append(i)
    if not by_class:
        return _message_png(
            f"No misclassified images ({len(preds.y_true)} of {len(preds.y_true)} correct)", path
        )
    shown = sorted(sorted(by_class, key=lambda c: -len(by_class[c]))[:max_rows])
    cols = min(per_class, max(len(by_class[c]) for c in shown))
    fig = Figure(figsize=(2.0 * cols, 2.3 * len(shown) + 0.6), layout="constrained")
    axes = fig.subplots(len(shown), cols, squeeze=False)
    for row, c in zip(axes, shown):
        errors = sorted(by_class[c], key=lambda i: -preds.confidence[i])[:per_class]
        for ax, i in zip(row, errors):
            ax.imshow(_thumbnail(preds.paths[i]))
            caption = f"true: {classes[c]} / pred: {classes[preds.y_pred[i]]} (p={preds.confidence[i]:.2f})"
            ax.set_title(textwrap.fill(caption, 30), fontsize=7)
        for ax in row:
            ax.axis("off")
    n_wrong = len(preds.wrong())
    title = (
        f"Misclassified: {n_wrong} of {len(preds.y_true)} images; "
        f"up to {per_class} per true class, most confident first"
    )
    if len(shown) < len(by_class):
        title += f" (the {len(shown)} of {len(by_class)} classes with most errors)"
    fig.suptitle(textwrap.fill(title, 18 * cols + 10), fontsize=10)
    return save_png(fig, path)


# ----------------------------------------------------------------- run folder


def analyse(run_dir, history: list[dict], preds: Predictions, classes) -> list[Path]:
    """Write the run's analysis files into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cm = confusion_matrix(preds.y_true, preds.y_pred, len(classes))
    rows = per_class_report(cm, classes)
    totals = summary(cm)
    return [
        plot_curves(history, run_dir / "curves.png"),
        plot_confusion(cm, classes, run_dir / "confusion_matrix.png"),
        write_csv(rows, run_dir / "per_class.csv"),
        write_markdown(rows, totals, run_dir / "per_class.md"),
        plot_per_class(rows, run_dir / "per_class.png"),
        plot_misclassified(preds, classes, run_dir / "misclassified.png"),
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Re-create a training run's analysis files from its best.pt and metrics.json."
    )
    p.add_argument("--run", required=True, type=Path, help="run folder with best.pt and metrics.json")
    p.add_argument("--data", required=True, type=Path, help="dataset root with train/ valid/ test/")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"), help="split to predict on")
    p.add_argument("--batch-size", type=int, default=32, help="images per inference batch")
    p.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    for name in ("best.pt", "metrics.json"):
        if not (a.run / name).is_file():
            sys.exit(f"error: {a.run / name} is missing: --run must be a training run folder")
    try:
        model, ckpt = load_checkpoint(a.run / "best.pt")
        ds = image_folder(a.data, a.split, EvalPreset.from_dict(ckpt["eval_preset"]).transform())
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if ds.classes != ckpt["classes"]:
        sys.exit(
            f"error: class folders of {a.data / a.split} differ from the checkpoint's: "
            f"{ds.classes} vs {ckpt['classes']}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preds = predict(model.to(device), loader(ds, a.batch_size, False, a.workers), device)
    history = json.loads((a.run / "metrics.json").read_text()).get("history", [])
    cm = confusion_matrix(preds.y_true, preds.y_pred, len(ds.classes))
    print(report_table(per_class_report(cm, ds.classes), summary(cm)))
    for path in analyse(a.run, history, preds, ds.classes):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
