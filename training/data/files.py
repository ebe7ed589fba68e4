"""What the data tools share: finding a dataset's class folders and image files,
strict decoding, output-folder checks and plain-text tables.

A dataset is ImageFolder-style, either unsplit (ROOT/CLASS/*.jpg, "flat") or
split (ROOT/{train,valid,test}/CLASS/*.jpg, as training.data.datasets reads it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from pathlib import Path

from PIL import ImageFile

# The extensions ImageFolder loads, so the tools see the files training will read.
from torchvision.datasets.folder import IMG_EXTENSIONS

from training.data.datasets import SPLITS

FLAT = None  # the "split" of an unsplit dataset's class folders


def is_hidden(name: str) -> bool:
    """Dot-files and dot-folders (.DS_Store, .ipynb_checkpoints) are never data."""
    return name.startswith(".")


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name))


def is_split_layout(root: Path) -> bool:
    """True when ROOT's folders are all split names (train/valid/test), none being a class."""
    names = {p.name for p in subdirs(root)}
    return bool(names) and names <= set(SPLITS)


def class_dirs(root: str | Path) -> list[tuple[str | None, str, Path]]:
    """(split, class, folder) for every class folder; split is None in the flat layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a folder")
    if not is_split_layout(root):
        return [(FLAT, d.name, d) for d in subdirs(root)]
    return [(s, d.name, d) for s in SPLITS if (root / s).is_dir() for d in subdirs(root / s)]


def list_files(folder: Path) -> list[Path]:
    """Every visible file under a class folder, recursively (ImageFolder walks sub-folders too)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        found += [Path(dirpath) / f for f in filenames if not is_hidden(f)]
    return sorted(found)


def has_image_extension(path: Path) -> bool:
    return path.name.lower().endswith(IMG_EXTENSIONS)


def list_images(folder: Path) -> list[Path]:
    """The files of a class folder that ImageFolder would load (by extension)."""
    return [p for p in list_files(folder) if has_image_extension(p)]


def rel(path: Path, root: Path) -> str:
    """Path relative to the dataset root, with forward slashes (for reports and tables)."""
    return Path(path).relative_to(root).as_posix()


@contextlib.contextmanager
def strict_decoding():
    """Refuse truncated images while inside, whatever another module set globally.

    Pillow's LOAD_TRUNCATED_IMAGES=True would make a cut-off JPEG decode with a grey
    bottom, which is exactly what clean must find.
    """
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def check_apart(source: Path, out: Path, what: str = "OUT") -> None:
    """Refuse an output folder that is the source, inside it, or contains it."""
    s, o = source.resolve(), out.resolve()
    if s == o or s in o.parents or o in s.parents:
        raise SystemExit(
            f"error: {what} {out} overlaps the dataset {source}; "
            f"choose a folder outside it (the source is never modified)"
        )


def prepare_out(out: Path, force: bool, replace: list[str]) -> None:
    """Create OUT; refuse a non-empty one unless force, which first removes OUT/<replace>.

    Removing the folders this run writes means no file from an earlier run is left
    mixed in (a stale image in train/ from another split would leak into test).
    """
    if out.exists() and any(out.iterdir()):
        if not force:
            raise SystemExit(
                f"error: output folder {out} is not empty; pass --force to "
                f"replace its {', '.join(n + '/' for n in replace)} folders"
            )
        for name in replace:
            target = out / name
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)  # removes links, never what they point to
    out.mkdir(parents=True, exist_ok=True)


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table: numeric columns right-aligned, the others left-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def tool_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """An argparse parser for one tool: its docstring's first paragraph as the description,
    the rest (kept as written) after the flags."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=head,
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
