"""Find the files of an image dataset that would hurt training (split or unsplit layout).

Every visible file in a class folder is decoded in full with the project's own
decoder (handlers.decode.open_image, truncated data not tolerated), whatever its
extension. Problem kinds:

  not_image       not an image format at all (a text file named .jpg)
  corrupt         an image format, but it does not decode to the end (truncated, damaged)
  too_large       over the decoder's pixel limit, so training would refuse it
  too_small       short side under --min-size pixels
  extreme_aspect  long side over 20 times the short one (training.data.datasets.MAX_ASPECT):
                  resizing the short side to the eval size would blow the long side up
                  (a 1 x 100000 PNG of a few hundred bytes to 25.6 gigapixels), so
                  training and analysis skip it with a warning
  duplicate       same bytes (SHA-256) as another file of the same class; the first in
                  sorted path order is kept, the others are flagged. A duplicate across
                  splits leaks a test or valid image into training.
  label_conflict  same bytes in folders of different classes: the label is unknown, so
                  every copy is flagged

Nothing moves unless --move-to DIR is given: then every flagged file is moved into
DIR under its path relative to ROOT, so `cp -a DIR/. ROOT/` puts them back.
Nothing is ever deleted. The JSON report (--report) lists every problem and where
it went.

Exit status: 0 when no problem was found, 3 when problems were found (moved or
not; a second run after --move-to gives 0), 2 for a wrong flag, 1 for other
errors (no such folder, a --move-to target that already exists).

    python -m training.data.clean --data data/mine
    python -m training.data.clean --data data/mine --move-to data/mine-flagged
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import UnidentifiedImageError

from handlers.decode import BadImage, open_image
from serving.archive import sha256
from training.data.datasets import shape_problem
from training.data.files import (
    check_apart,
    class_dirs,
    format_table,
    list_files,
    rel,
    strict_decoding,
    tool_parser,
)
from training.progress import Progress

KINDS = ("not_image", "corrupt", "too_large", "too_small", "extreme_aspect", "duplicate", "label_conflict")
EXIT_PROBLEMS = 3


@dataclass
class Problem:
    path: str  # relative to the dataset root
    kind: str  # one of KINDS
    detail: str
    sha256: str = ""
    moved_to: str = ""  # filled in by move_problems


@dataclass
class Scanned:
    path: Path
    cls: str
    sha256: str


def decode_problem(path: Path, min_size: int) -> tuple[str, str] | None:
    """(kind, detail) of one file's decoding problem, or None for a usable image."""
    try:
        with strict_decoding():
            img = open_image(str(path))
    except BadImage as e:
        if e.reason == "too_large":
            return "too_large", str(e)
        if isinstance(e.__cause__, UnidentifiedImageError):
            return "not_image", "not a recognised image format"
        return "corrupt", str(e)
    # Before too_small: a 1 x 100000 strip is small too, but its shape is what sinks a run.
    shape = shape_problem(img.size)
    if shape:
        return "extreme_aspect", shape
    if min(img.size) < min_size:
        return "too_small", f"{img.size[0]}x{img.size[1]} px, short side under {min_size}"
    return None


def leak(path: str, kept: str) -> str:
    """A note when two copies sit in different splits (the first path part differs only
    in the split layout: in the flat one it is the class, the same for both)."""
    a, b = path.split("/")[0], kept.split("/")[0]
    return f" (in {b}/ too: the same image in two splits)" if a != b else ""


def duplicate_problems(images: list[Scanned], root: Path) -> list[Problem]:
    """Same-class copies after the first (duplicate) and all copies across classes
    (label_conflict), from the usable images' hashes."""
    groups = defaultdict(list)
    for s in images:
        groups[s.sha256].append(s)
    found = []
    for digest, group in groups.items():
        if len(group) < 2:
            continue
        group.sort(key=lambda s: rel(s.path, root))
        names = [rel(s.path, root) for s in group]
        classes = sorted({s.cls for s in group})
        if len(classes) > 1:
            found += [
                Problem(
                    n,
                    "label_conflict",
                    f"same bytes in classes {', '.join(classes)}: " + ", ".join(names),
                    digest,
                )
                for n in names
            ]
        else:
            found += [
                Problem(n, "duplicate", f"copy of {names[0]}" + leak(n, names[0]), digest) for n in names[1:]
            ]
    return found


def find_problems(root: str | Path, min_size: int = 32) -> list[Problem]:
    """Every problem of the dataset at root, sorted by path (see the module docstring)."""
    root = Path(root)
    files = [(cls, f) for _, cls, d in class_dirs(root) for f in list_files(d)]
    bar = Progress(len(files), "clean: decoding")
    problems, usable = [], []
    for i, (cls, f) in enumerate(files, 1):
        digest = sha256(f)
        found = decode_problem(f, min_size)
        if found:
            problems.append(Problem(rel(f, root), *found, sha256=digest))
        else:
            usable.append(Scanned(f, cls, digest))
        bar.update(i, flagged=len(problems))
    problems += duplicate_problems(usable, root)
    return sorted(problems, key=lambda p: (p.path, p.kind))


def move_problems(root: Path, problems: list[Problem], dest: Path) -> None:
    """Move each flagged file to dest/<its relative path>; refuses before moving anything
    if one of those targets already exists (nothing is overwritten)."""
    taken = [str(dest / p.path) for p in problems if (dest / p.path).exists()]
    if taken:
        raise SystemExit(
            f"error: {len(taken)} file(s) already in {dest}, e.g. {taken[0]}; "
            f"restore or remove them first, or choose another --move-to"
        )
    for p in problems:
        target = dest / p.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(root / p.path), str(target))
        p.moved_to = str(target)


def summary(problems: list[Problem], scanned: int) -> str:
    """Counts per kind, then one line per flagged file."""
    counts = [[k, sum(p.kind == k for p in problems)] for k in KINDS]
    lines = [
        format_table(["problem", "files"], counts + [["TOTAL", len(problems)]]),
        f"{scanned} files scanned, {len(problems)} flagged",
    ]
    if problems:
        lines += [
            "",
            format_table(["file", "problem", "detail"], [[p.path, p.kind, p.detail] for p in problems]),
        ]
    return "\n".join(lines)


def default_report(root: Path) -> Path:
    """Beside the dataset, not in it: a file in a class folder would be scanned next time."""
    root = root.resolve()
    return root.parent / f"{root.name}-clean-report.json"


def write_report(
    path: Path, root: Path, min_size: int, scanned: int, problems: list[Problem], moved_to: Path | None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "root": str(root),
        "min_size": min_size,
        "files_scanned": scanned,
        "counts": {k: sum(p.kind == k for p in problems) for k in KINDS},
        "moved_to": str(moved_to) if moved_to else None,
        "problems": [asdict(p) for p in problems],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")


def parse_args(argv=None):
    p = tool_parser("training.data.clean", __doc__)
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="dataset root: ROOT/CLASS/* or ROOT/{train,valid,test}/CLASS/*",
    )
    p.add_argument(
        "--min-size", type=int, default=32, help="smallest usable short side in pixels (default: 32)"
    )
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        help="JSON report path (default: ROOT-clean-report.json beside ROOT)",
    )
    p.add_argument(
        "--move-to",
        type=Path,
        default=None,
        metavar="DIR",
        help="move flagged files into DIR, keeping their paths relative to ROOT "
        "(DIR must be outside ROOT); without it nothing is moved",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if not a.data.is_dir():
        raise SystemExit(f"error: --data {a.data} is not a folder")
    if a.move_to:
        check_apart(a.data, a.move_to, "--move-to")
    dirs = class_dirs(a.data)
    if not dirs:
        raise SystemExit(f"error: no class folders in {a.data}")
    scanned = sum(len(list_files(d)) for _, _, d in dirs)
    problems = find_problems(a.data, a.min_size)
    if a.move_to and problems:
        move_problems(a.data, problems, a.move_to)
    report = a.report or default_report(a.data)
    write_report(report, a.data, a.min_size, scanned, problems, a.move_to)
    print(summary(problems, scanned))
    if a.move_to and problems:
        print(f"moved {len(problems)} files to {a.move_to} (restore: cp -a {a.move_to}/. {a.data}/)")
    print(f"report: {report}")
    return EXIT_PROBLEMS if problems else 0


if __name__ == "__main__":
    sys.exit(main())
