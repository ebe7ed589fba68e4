"""Write a resized JPEG copy of an image dataset into OUT, keeping its folder layout.

Works on both layouts (ROOT/CLASS/* and ROOT/{train,valid,test}/CLASS/*) and
reads the files ImageFolder would (by extension). Each image is decoded with
handlers.decode.open_image (EXIF orientation applied, RGB, truncated data
refused), resized, and saved as OUT/<same path>.jpg. The default is what the
original project did: stretch to exactly 300x300. --keep-aspect instead scales
the short side to --size and keeps the proportions. Files that do not decode are
listed and skipped, never copied.

    python -m training.data.resize --data data/mine --out data/mine-300
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from handlers.decode import BadImage, open_image
from training.data.files import (
    check_apart,
    class_dirs,
    list_images,
    prepare_out,
    rel,
    strict_decoding,
    tool_parser,
)
from training.progress import Progress


def target_size(w: int, h: int, size: int, keep_aspect: bool) -> tuple[int, int]:
    """size x size, or the short side at size and the long side in proportion."""
    if not keep_aspect:
        return size, size
    scale = size / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_image(img: Image.Image, size: int, keep_aspect: bool) -> Image.Image:
    return img.resize(target_size(*img.size, size, keep_aspect), Image.Resampling.BICUBIC)


def plan_outputs(files: list[Path], root: Path) -> dict[Path, str]:
    """Each source file's output path relative to OUT, ending in .jpg.

    a.png and a.jpg in one folder would both become a.jpg: the later one keeps its
    full name (a.png.jpg) so no image overwrites another.
    """
    out, used = {}, set()
    for f in sorted(files):
        name = Path(rel(f, root)).with_suffix(".jpg").as_posix()
        if name in used:
            name = rel(f, root) + ".jpg"
        used.add(name)
        out[f] = name
    return out


def resize_dataset(
    root: Path, out: Path, size: int, keep_aspect: bool, quality: int
) -> tuple[int, list[tuple[str, str]]]:
    """Resize every image of root into out; returns (written, [(file, why skipped)])."""
    files = [f for _, _, d in class_dirs(root) for f in list_images(d)]
    targets = plan_outputs(files, root)
    bar = Progress(len(files), "resize")
    written, skipped = 0, []
    for i, (src, name) in enumerate(targets.items(), 1):
        try:
            with strict_decoding():
                img = open_image(str(src))
        except BadImage as e:
            skipped.append((rel(src, root), str(e)))
        else:
            dst = out / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            resize_image(img, size, keep_aspect).save(dst, "JPEG", quality=quality)
            written += 1
        bar.update(i, skipped=len(skipped))
    return written, skipped


def parse_args(argv=None):
    p = tool_parser("training.data.resize", __doc__)
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="dataset root: ROOT/CLASS/* or ROOT/{train,valid,test}/CLASS/*",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="where to write the resized copy (must be empty, see --force)"
    )
    p.add_argument(
        "--size", type=int, default=300, help="output side in pixels (default: 300, as the original project)"
    )
    p.add_argument(
        "--keep-aspect",
        action="store_true",
        help="scale the short side to --size and keep the proportions, instead "
        "of stretching to exactly size x size",
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1-95 (default: 90)")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty OUT, first removing the top-level folders "
        "this run writes (those of the dataset root)",
    )
    a = p.parse_args(argv)
    if a.size < 1:
        p.error(f"--size {a.size}: must be at least 1")
    if not 1 <= a.quality <= 95:
        p.error(f"--quality {a.quality}: allowed 1 to 95 (Pillow advises against more)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if not a.data.is_dir():
        raise SystemExit(f"error: --data {a.data} is not a folder")
    check_apart(a.data, a.out)
    top = sorted({rel(d, a.data).split("/")[0] for _, _, d in class_dirs(a.data)})
    prepare_out(a.out, a.force, top)
    written, skipped = resize_dataset(a.data, a.out, a.size, a.keep_aspect, a.quality)
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    shape = f"short side {a.size}" if a.keep_aspect else f"{a.size}x{a.size}"
    print(
        f"wrote {written} JPEGs ({shape}, quality {a.quality}) to {a.out}; skipped {len(skipped)} undecodable"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
