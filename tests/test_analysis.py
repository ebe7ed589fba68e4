"""Tests of training/evaluation/analysis.py: metrics on hand-made examples, predict() on a tiny
model and a tiny generated ImageFolder, and the files analyse() writes."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from handlers.preset import EvalPreset
from models.zoo import get_model
from training.data.datasets import image_folder, loader
from training.demo.shapes import generate
from training.evaluation import analysis as an

CLASSES = ["circle", "square"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """2 classes x 4 images of 64 px: 3 train and 1 valid per class."""
    root = tmp_path_factory.mktemp("shapes")
    generate(root, per_class=4, classes=tuple(CLASSES), size=64, seed=1, quiet=True)
    return root


def small_dataset(root, split="train"):
    return image_folder(root, split, T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()]))


def tiny_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))


class PairModel(nn.Module):
    """Returns (class logits, aux logits) like resnet50 with an ImageNet head.

    The aux output is the negated logits: using it would flip every prediction.
    """

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out, -out


def history(losses=(1.0, 0.6, 0.7)):
    return [
        {
            "epoch": i,
            "train": {"loss": loss + 0.1, "acc": 0.5 + 0.1 * i},
            "valid": {"loss": loss, "acc": 0.4 + 0.1 * i},
            "lr": 0.01 / i,
        }
        for i, loss in enumerate(losses, 1)
    ]


# y_true = [0,0,0,1,1,2], y_pred = [0,1,0,1,1,0] over 4 classes; class 3 has no images.
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 1, 0, 1, 1, 0]


def test_confusion_matrix_counts():
    cm = an.confusion_matrix(Y_TRUE, Y_PRED, 4)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_confusion_matrix_refuses_labels_out_of_range():
    with pytest.raises(ValueError, match="outside 0..1"):
        an.confusion_matrix([0, 2], [0, 1], 2)


def test_per_class_report_by_hand():
    cm = an.confusion_matrix(Y_TRUE, Y_PRED, 4)
    rows = an.per_class_report(cm, ["a", "b", "c", "d"])
    by = {r["class"]: r for r in rows}
    # a: 2 right of 3 predicted a (column 0: 2 + 1 from c), 2 right of 3 true a.
    assert by["a"]["precision"] == pytest.approx(2 / 3)
    assert by["a"]["recall"] == pytest.approx(2 / 3)
    assert by["a"]["f1"] == pytest.approx(2 / 3)
    # b: 2 right of 3 predicted b, both true b found: F1 = 2 * 2/3 * 1 / (2/3 + 1) = 0.8.
    assert by["b"]["precision"] == pytest.approx(2 / 3)
    assert by["b"]["recall"] == 1.0
    assert by["b"]["f1"] == pytest.approx(0.8)
    # c is never predicted: precision 0/0 -> 0.0; its one image is missed.
    assert (by["c"]["precision"], by["c"]["recall"], by["c"]["f1"]) == (0.0, 0.0, 0.0)
    # d has no images and no predictions: every ratio is 0/0 -> 0.0.
    assert (by["d"]["precision"], by["d"]["recall"], by["d"]["f1"]) == (0.0, 0.0, 0.0)
    assert [r["support"] for r in rows] == [3, 2, 1, 0]
    assert [r["class"] for r in rows] == ["a", "b", "c", "d"]


def test_summary_by_hand():
    s = an.summary(an.confusion_matrix(Y_TRUE, Y_PRED, 4))
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["macro_precision"] == pytest.approx((2 / 3 + 2 / 3) / 4)
    assert s["macro_recall"] == pytest.approx((2 / 3 + 1) / 4)
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 4)
    assert s["total"] == 6


def test_report_table_lines():
    cm = an.confusion_matrix(Y_TRUE, Y_PRED, 4)
    text = an.report_table(an.per_class_report(cm, ["a", "bee", "c", "d"]), an.summary(cm))
    lines = text.splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support"]
    assert lines[2].split() == ["bee", "0.667", "1.000", "0.800", "2"]
    assert lines[-1].split() == ["accuracy", "0.667", "6"]
    assert len({len(line) for line in lines if line}) == 1  # fixed width


def test_best_epoch_is_lowest_valid_loss():
    assert an.best_epoch(history((1.0, 0.6, 0.7)))["epoch"] == 2
    assert an.best_epoch(history((0.5, 0.6, 0.5)))["epoch"] == 1  # first of a tie, as the trainer


def test_predict_matches_dataset_and_argmax(shapes):
    ds = small_dataset(shapes)
    model = tiny_model()
    model.train()
    preds = an.predict(model, loader(ds, batch_size=4, shuffle=False, workers=0), "cpu")
    assert preds.paths == [p for p, _ in ds.samples]
    assert preds.y_true == [y for _, y in ds.samples] == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        probs = model.eval()(x).softmax(1)
    assert preds.y_pred == probs.argmax(1).tolist()
    assert preds.confidence == pytest.approx(probs.max(1).values.tolist())
    assert model.training is False  # eval() above; predict restores the mode it found
    model.train()
    an.predict(model, loader(ds, batch_size=4, shuffle=False, workers=0), "cpu")
    assert model.training is True


def test_predict_uses_first_element_of_a_tuple(shapes):
    ds = small_dataset(shapes)
    dl = loader(ds, batch_size=5, shuffle=False, workers=0)
    plain = an.predict(tiny_model(), dl, "cpu")
    pair = an.predict(PairModel(tiny_model()), dl, "cpu")
    # The aux output (negated logits) would flip all 6 answers, so equality shows
    # the class logits were used.
    assert len(plain.y_pred) == 6
    assert pair == plain


def test_predict_refuses_a_shuffling_loader(shapes):
    with pytest.raises(ValueError, match="shuffle=False"):
        an.predict(tiny_model(), loader(small_dataset(shapes), 4, True, 0), "cpu")


def png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


@pytest.mark.slow
def test_analyse_writes_all_files(shapes, tmp_path):
    ds = small_dataset(shapes)
    paths = [p for p, _ in ds.samples]
    y_true = [y for _, y in ds.samples]
    y_pred = [0, 1, 0, 0, 1, 0]  # one circle and two squares wrong
    preds = an.Predictions(y_true, y_pred, [0.9, 0.8, 0.7, 0.6, 0.55, 0.99], paths)
    written = an.analyse(tmp_path / "run", history(), preds, CLASSES)
    names = {p.name for p in written}
    assert names == {
        "curves.png",
        "confusion_matrix.png",
        "per_class.csv",
        "per_class.md",
        "per_class.png",
        "misclassified.png",
    }
    for p in written:
        assert p.parent == tmp_path / "run" and p.stat().st_size > 0
        if p.suffix == ".png":
            assert png_size(p)  # a PNG that opens
    rows = an.per_class_report(an.confusion_matrix(y_true, y_pred, 2), CLASSES)
    with open(tmp_path / "run" / "per_class.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert [r["class"] for r in read] == CLASSES
    for got, want in zip(read, rows):
        for key in ("precision", "recall", "f1"):
            assert float(got[key]) == want[key]
        assert int(got["support"]) == want["support"]
    md = (tmp_path / "run" / "per_class.md").read_text()
    # circle: 2 of 3 circles found, 2 of the 4 "circle" answers right; F1 = 2*.5*(2/3)/(7/6).
    assert "| circle | 0.500 | 0.667 | 0.571 | 3 |" in md
    assert "| **accuracy** |  |  | 0.500 | 6 |" in md


def saved_figures(monkeypatch) -> dict:
    """Every figure training.evaluation.analysis saves, by file name: what it draws can be read back."""
    figures = {}
    real = an.save_png

    def save(fig, path, *args, **kw):
        figures[Path(path).name] = fig
        return real(fig, path, *args, **kw)

    monkeypatch.setattr(an, "save_png", save)
    return figures


def test_curves_draw_the_history(monkeypatch, tmp_path):
    figures = saved_figures(monkeypatch)
    h = history()
    an.plot_curves(h, tmp_path / "curves.png")
    loss, acc = figures["curves.png"].axes[:2]
    drawn = {ax: [list(line.get_ydata()) for line in ax.get_lines()] for ax in (loss, acc)}
    for split in ("train", "valid"):
        assert [e[split]["loss"] for e in h] in drawn[loss], split
        assert [100 * e[split]["acc"] for e in h] in drawn[acc], split
    best = [line for line in loss.get_lines() if line.get_marker() == "*"]
    assert [(list(b.get_xdata()), list(b.get_ydata())) for b in best] == [([2], [0.6])]  # lowest


@pytest.mark.slow
def test_misclassified_grid_shows_each_classs_errors_most_confident_first(shapes, tmp_path, monkeypatch):
    ds = small_dataset(shapes)
    paths = [p for p, _ in ds.samples]
    y_true = [y for _, y in ds.samples]
    assert y_true == [0, 0, 0, 1, 1, 1]
    drawn = []
    real = an._thumbnail
    monkeypatch.setattr(an, "_thumbnail", lambda p: drawn.append(p) or real(p))
    figures = saved_figures(monkeypatch)
    # Two circles wrong (the third image more confidently), one square wrong.
    conf = [0.6, 0.9, 0.95, 0.7, 0.9, 0.9]
    an.plot_misclassified(
        an.Predictions(y_true, [1, 0, 1, 0, 1, 1], conf, paths), CLASSES, tmp_path / "grid.png"
    )
    assert drawn == [paths[2], paths[0], paths[3]]
    axes = figures["grid.png"].axes
    assert len(axes) == 2 * 2  # a row per class with errors, as many columns as the most errors
    assert axes[0].get_title() == "true: circle / pred: square\n(p=0.95)"
    assert axes[2].get_title() == "true: square / pred: circle\n(p=0.70)"
    drawn.clear()
    none = an.analyse(tmp_path / "ok", history(), an.Predictions(y_true, y_true, conf, paths), CLASSES)
    assert tmp_path / "ok" / "misclassified.png" in none and drawn == []
    assert "No misclassified images (6 of 6 correct)" in [
        t.get_text() for t in figures["misclassified.png"].texts
    ]


@pytest.mark.slow
def test_plot_confusion_draws_the_row_normalised_matrix(tmp_path, monkeypatch):
    figures = saved_figures(monkeypatch)
    rng = random.Random(0)
    y_true = [i % 133 for i in range(1330)]
    y_pred = [y if rng.random() < 0.8 else rng.randrange(133) for y in y_true]
    cm = an.confusion_matrix(y_true, y_pred, 133)
    names = [f"Breed_number_{i:03d}" for i in range(133)]
    an.plot_confusion(cm, names, tmp_path / "cm133.png")
    an.plot_confusion(an.confusion_matrix(Y_TRUE, Y_PRED, 4), list("abcd"), tmp_path / "cm4.png")
    big = figures["cm133.png"].axes[0].images[0].get_array()
    assert big.shape == (133, 133)
    assert torch.allclose(torch.tensor(big.data), (cm / 10.0).double())  # ten images per class
    small = figures["cm4.png"].axes[0]
    # Y_TRUE/Y_PRED: circle 2 of 3 right, 1 as class 1; class 3 has no images (a row of 0).
    assert small.images[0].get_array().data.tolist() == [
        [2 / 3, 1 / 3, 0, 0],
        [0, 1, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
    ]
    # Each count written in its cell, at (column = predicted, row = true).
    assert sorted((t.get_position(), t.get_text()) for t in small.texts) == [
        ((0, 0), "2"),
        ((0, 2), "1"),
        ((1, 0), "1"),
        ((1, 1), "2"),
    ]
    # The figure grows with the classes, so 133 stay readable.
    assert png_size(tmp_path / "cm133.png")[1] > 2 * png_size(tmp_path / "cm4.png")[1]


@pytest.mark.slow
def test_cli_recreates_analysis(shapes, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    preset = EvalPreset(resize_size=224, crop_size=224)
    torch.manual_seed(0)
    model = get_model("scratch_cnn", 2)
    torch.save(
        {
            "model": "scratch_cnn",
            "model_options": {},
            "num_classes": 2,
            "classes": CLASSES,
            "eval_preset": preset.to_dict(),
            "epoch": 2,
            "state_dict": model.state_dict(),
        },
        run / "best.pt",
    )
    (run / "metrics.json").write_text(json.dumps({"history": history()}))
    an.main(
        ["--run", str(run), "--data", str(shapes), "--split", "valid", "--batch-size", "2", "--workers", "0"]
    )
    for name in (
        "curves.png",
        "confusion_matrix.png",
        "per_class.csv",
        "per_class.md",
        "per_class.png",
        "misclassified.png",
    ):
        assert (run / name).is_file(), name
    with open(run / "per_class.csv", newline="") as f:
        assert sum(int(r["support"]) for r in csv.DictReader(f)) == 2  # 1 valid image per class
