"""Split a folder of class folders (ROOT/CLASS/*.jpg) into OUT/{train,valid,test}/CLASS.

Each class is split by the ratios on its own (stratified), so every split keeps
the class proportions. The order is the sorted file list shuffled with a
random.Random seeded by --seed and the class name: the same seed gives the same
split, and adding a class does not change the others. Rounding is half-up, and
valid and test get at least one image of every class (taken from train) when
their ratio is above zero, because training.data.datasets needs every class folder in
every split. A class with fewer images than that (one per non-empty split) is an
error naming it, unless --skip-small leaves it out. The source is never modified.

    python -m training.data.split --data raw_images --out data/mine --ratios 0.8 0.1 0.1
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
from pathlib import Path

from training.data.datasets import SPLITS
from training.data.files import (
    check_apart,
    class_dirs,
    format_table,
    is_split_layout,
    list_images,
    prepare_out,
    tool_parser,
)
from training.progress import Progress


def split_sizes(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Images per split for a class of n images: half-up rounding, at least one in each
    non-empty holdout split, the rest in train (which keeps at least one)."""
    total = sum(ratios)
    # 1e-9: 0.15 * 10 must round as 1.5 (half up), not as the float 1.4999999999999998.
    holdout = [max(1, math.floor(n * r / total + 0.5 + 1e-9)) if r > 0 else 0 for r in ratios[1:]]
    while n - sum(holdout) < 1 and max(holdout) > 1:  # extreme ratios: give train its one
        holdout[holdout.index(max(holdout))] -= 1
    if n - sum(holdout) < 1:
        raise ValueError(f"{n} images cannot fill every split with a non-zero ratio")
    return n - sum(holdout), holdout[0], holdout[1]


def min_images(ratios) -> int:
    """The smallest class that split_sizes can handle: one image per non-empty split."""
    return sum(1 for r in ratios if r > 0)


def plan_split(files_by_class: dict[str, list[Path]], ratios, seed: int) -> dict:
    """{split: {class: [files]}}: each class shuffled on its own seed, then cut by ratios."""
    plan = {s: {} for s in SPLITS}
    for cls, files in sorted(files_by_class.items()):
        order = sorted(files)
        random.Random(f"{seed}:{cls}").shuffle(order)
        n_train, n_valid, _ = split_sizes(len(order), ratios)
        cuts = {
            "train": order[:n_train],
            "valid": order[n_train : n_train + n_valid],
            "test": order[n_train + n_valid :],
        }
        for s in SPLITS:
            plan[s][cls] = sorted(cuts[s])
    return plan


def place(src: Path, dst: Path, mode: str) -> None:
    """Copy, hard-link or symlink (absolute target) one file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":
        shutil.copy2(src, dst)
    elif mode == "hardlink":
        os.link(src, dst)
    else:
        dst.symlink_to(src.resolve())


def write_split(plan: dict, data: Path, out: Path, mode: str) -> int:
    """Write the plan into OUT, keeping each file's path inside its class folder."""
    jobs = [
        (f, out / s / cls / f.relative_to(data / cls))
        for s in SPLITS
        for cls, files in plan[s].items()
        for f in files
    ]
    bar = Progress(len(jobs), f"split ({mode})")
    for i, (src, dst) in enumerate(jobs, 1):
        place(src, dst, mode)
        bar.update(i)
    return len(jobs)


def count_table(plan: dict) -> str:
    """Per-class counts of a plan, with a total row."""
    rows = [
        [cls] + [len(plan[s][cls]) for s in SPLITS] + [sum(len(plan[s][cls]) for s in SPLITS)]
        for cls in sorted(plan["train"])
    ]
    rows.append(["TOTAL"] + [sum(r[i] for r in rows) for i in range(1, 5)])
    return format_table(["class", *SPLITS, "total"], rows)


def parse_args(argv=None):
    p = tool_parser("training.data.split", __doc__)
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="unsplit dataset: one folder per class of images (ROOT/CLASS/*.jpg)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="where to write train/, valid/ and test/ (must be empty, see --force)",
    )
    p.add_argument(
        "--ratios",
        type=float,
        nargs=3,
        default=[0.8, 0.1, 0.1],
        metavar=("TRAIN", "VALID", "TEST"),
        help="split proportions, normalised by their sum (default: 0.8 0.1 0.1)",
    )
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (same seed, same split)")
    p.add_argument(
        "--mode",
        choices=("copy", "hardlink", "symlink"),
        default="copy",
        help="how files reach OUT: copy (default), hardlink (same filesystem, "
        "no extra space; an in-place edit then changes the source too) or "
        "symlink (absolute links to the source)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty OUT, first removing its train/, valid/ and "
        "test/ folders so nothing from an earlier split stays behind",
    )
    p.add_argument(
        "--skip-small",
        action="store_true",
        help="leave out classes with too few images for every split, instead of "
        "stopping with an error that names them",
    )
    a = p.parse_args(argv)
    if any(r < 0 for r in a.ratios) or a.ratios[0] <= 0:
        p.error(f"--ratios {a.ratios}: all must be >= 0 and the train ratio > 0")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if not a.data.is_dir():
        raise SystemExit(f"error: --data {a.data} is not a folder")
    if is_split_layout(a.data):
        raise SystemExit(
            f"error: {a.data} is already split into {'/'.join(SPLITS)}; --data takes ROOT/CLASS/*.jpg"
        )
    check_apart(a.data, a.out)
    files = {cls: list_images(d) for _, cls, d in class_dirs(a.data)}
    need = min_images(a.ratios)
    small = {c: len(f) for c, f in files.items() if len(f) < need}
    if small and not a.skip_small:
        raise SystemExit(
            f"error: classes with fewer than {need} images (one per split): "
            f"{small}; add images, remove them, or pass --skip-small "
            f"to leave them out"
        )
    files = {c: f for c, f in files.items() if c not in small}
    if not files:
        raise SystemExit(f"error: no class folder with images in {a.data}")
    plan = plan_split(files, tuple(a.ratios), a.seed)
    prepare_out(a.out, a.force, list(SPLITS))
    n = write_split(plan, a.data, a.out, a.mode)
    print(count_table(plan))
    if small:
        print(
            f"left out (fewer than {need} images): "
            + ", ".join(f"{c} ({k})" for c, k in sorted(small.items()))
        )
    print(f"wrote {n} files to {a.out} ({a.mode}, seed {a.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
