"""Generate the embedded demo dataset: coloured shapes on varied backgrounds.

No dataset ships with the project and pretrained weights cannot be fetched on
every machine, so the demo and the tests train on images made here:
deterministic for a seed, in ImageFolder layout with train/valid/test splits.

Each class is a shape *and* a hue band (circle red, square green, triangle blue,
star yellow) on a low-saturation background. The hue is there on purpose: the
demo trains from random weights, and a frozen random backbone carries colour
but not shape (measured: a linear probe on random ResNet50/MobileNetV2 features
reached chance level on shapes of random colours). With ImageNet weights the
shapes alone would do.

    python -m training.demo.shapes --out data/demo
"""

from __future__ import annotations

import argparse
import colorsys
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star")
HUES = {"circle": 0.0, "square": 1 / 3, "triangle": 2 / 3, "star": 1 / 6}  # red, green, blue, yellow


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _background(rng: random.Random, size: int) -> Image.Image:
    """A gradient between two muted random colours, with speckle noise."""
    c0 = _hsv(rng.random(), rng.uniform(0, 0.25), rng.uniform(0.15, 0.95))
    c1 = _hsv(rng.random(), rng.uniform(0, 0.25), rng.uniform(0.15, 0.95))
    grad = Image.linear_gradient("L").resize((size, size)).rotate(rng.uniform(0, 360))
    img = Image.composite(Image.new("RGB", (size, size), c1), Image.new("RGB", (size, size), c0), grad)
    draw = ImageDraw.Draw(img)
    for _ in range(size * size // 200):
        x, y = rng.randrange(size), rng.randrange(size)
        v = rng.randrange(256)
        draw.point((x, y), fill=(v, v, v))
    return img


def _polygon(cx: float, cy: float, r: float, n: int, angle: float, inner: float = 1.0):
    """Vertices of a regular polygon (inner < 1 alternates radii: a star)."""
    pts = []
    k = n * (2 if inner < 1 else 1)
    for i in range(k):
        rad = r if i % 2 == 0 or inner >= 1 else r * inner
        a = angle + 2 * math.pi * i / k
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_shape(shape: str, rng: random.Random, size: int = 256) -> Image.Image:
    """One image of ``shape`` in its hue band, with random size, position and rotation."""
    if shape not in HUES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.28, 0.42) * size
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    color = _hsv(HUES[shape] + rng.uniform(-0.04, 0.04), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, angle), fill=color)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, angle), fill=color)
    else:
        draw.polygon(_polygon(cx, cy, r, 5, angle, inner=0.45), fill=color)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


def generate(
    out: Path,
    per_class: int = 100,
    classes=SHAPES,
    size: int = 256,
    ratios=(0.7, 0.15, 0.15),
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, int]:
    """Write ``per_class`` JPEGs per class, split by ``ratios``; returns images per split."""
    counts = {"train": 0, "valid": 0, "test": 0}
    n_train = round(per_class * ratios[0])
    n_valid = round(per_class * ratios[1])
    total = per_class * len(classes)
    done = 0
    for ci, name in enumerate(classes):
        rng = random.Random(seed * 1000 + ci)
        for i in range(per_class):
            split = "train" if i < n_train else "valid" if i < n_train + n_valid else "test"
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            draw_shape(name, rng, size).save(folder / f"{name}_{i:04d}.jpg", quality=90)
            counts[split] += 1
            done += 1
            if not quiet and (done % 50 == 0 or done == total):
                print(f"\rdemo data: {done}/{total} images", end="", file=sys.stderr, flush=True)
    if not quiet:
        print(file=sys.stderr)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("data/demo"), help="dataset root to write")
    p.add_argument("--per-class", type=int, default=100, help="images per class (all splits)")
    p.add_argument(
        "--classes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}"
    )
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    a = p.parse_args(argv)
    classes = tuple(c.strip() for c in a.classes.split(",") if c.strip())
    unknown = set(classes) - set(SHAPES)
    if unknown:
        p.error(f"unknown class(es) {sorted(unknown)}; known: {', '.join(SHAPES)}")
    counts = generate(a.out, a.per_class, classes, a.size, seed=a.seed)
    print(f"wrote {sum(counts.values())} images to {a.out} ({counts})")


if __name__ == "__main__":
    main()
