"""Write scikit-learn's handwritten digits as a folder of class folders, as a user's own data.

    python -m training.demo.digits --out data/digits-raw
    python -m training.data.split --data data/digits-raw --out data/digits --ratios 0.7 0.15 0.15

A real labelled dataset that installs offline: ``sklearn.datasets.load_digits`` ships
the 1,797 8x8 images (ten classes, 0-9, about 180 each) of the UCI "Optical Recognition
of Handwritten Digits" test set inside the package. Each image is written as a grey PNG,
dark ink on white as the digits were written, upscaled from 8x8 to ``--size`` pixels
(bilinear), so that the data tools' minimum size (32 px) holds and a CNN has room for
its strides. Needs scikit-learn (requirements-data.txt), which the rest of the
project does not.

``--splits TRAIN VALID TEST`` writes a small split dataset instead (train/ valid/ test/,
that many images per class, the first of each class in the file's order): a real
dataset that trains in seconds, for tests and quick comparisons.

    python -m training.demo.digits --out data/digits-small --size 32 --splits 30 10 30
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# load_digits counts ink in 0..16 (4x4 blocks of a 32x32 bitmap): 16 is fully inked.
INK_LEVELS = 16


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """One 8x8 digit (0..16 ink) as a ``size`` x ``size`` grey image, ink dark on white."""
    grey = np.round(255 - pixels.reshape(8, 8) * (255 / INK_LEVELS)).astype(np.uint8)
    return Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR)


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit(
            "error: training.demo.digits needs scikit-learn: .venv/bin/pip install -r requirements-data.txt"
        ) from None
    return load_digits()


def write_digits(out: Path, size: int = 32) -> dict[str, int]:
    """Write every digit to out/<class>/digit_<index>.png; returns images per class."""
    digits = _load_digits()
    counts: dict[str, int] = {}
    for i, (pixels, label) in enumerate(zip(digits.data, digits.target)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        digit_image(pixels, size).save(folder / f"digit_{i:04d}.png")
        counts[str(label)] = counts.get(str(label), 0) + 1
    return counts


def write_split_digits(out: Path, per_split: tuple[int, int, int], size: int = 32) -> dict[str, int]:
    """Write out/{train,valid,test}/<class>/digit_<index>.png with ``per_split`` images of
    each class (the first of that class, in order: the same files every time); returns
    images per split."""
    digits = _load_digits()
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(digits.target):
        by_class.setdefault(str(label), []).append(i)
    short = {c: len(ix) for c, ix in by_class.items() if len(ix) < sum(per_split)}
    if short:
        raise ValueError(f"{sum(per_split)} images per class asked; classes with fewer: {short}")
    counts = dict.fromkeys(("train", "valid", "test"), 0)
    for label, indices in sorted(by_class.items()):
        start = 0
        for split, n in zip(counts, per_split):
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in indices[start : start + n]:
                digit_image(digits.data[i], size).save(folder / f"digit_{i:04d}.png")
            start += n
            counts[split] += n
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder to write the class folders into (must be empty or new)",
    )
    p.add_argument(
        "--size", type=int, default=32, help="side of the written images in pixels (the source is 8x8)"
    )
    p.add_argument(
        "--splits",
        type=int,
        nargs=3,
        metavar=("TRAIN", "VALID", "TEST"),
        help="write train/ valid/ test/ with this many images of each class "
        "(a small dataset) instead of every image in one folder per class",
    )
    a = p.parse_args(argv)
    if a.size < 8:
        p.error(f"--size {a.size}: at least 8, the digits' own resolution")
    if a.out.exists() and any(a.out.iterdir()):
        p.error(f"--out {a.out} is not empty; choose a new folder")
    if a.splits:
        if min(a.splits) < 1:
            p.error(f"--splits {' '.join(map(str, a.splits))}: every split needs an image per class")
        try:
            counts = write_split_digits(a.out, tuple(a.splits), a.size)
        except ValueError as e:
            p.error(str(e))
        print(
            f"wrote {sum(counts.values())} images of {a.size}x{a.size} px to {a.out} "
            f"({', '.join(f'{s} {n}' for s, n in counts.items())})",
            file=sys.stderr,
        )
        return
    counts = write_digits(a.out, a.size)
    print(
        f"wrote {sum(counts.values())} images of {a.size}x{a.size} px in {len(counts)} class "
        f"folders to {a.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
