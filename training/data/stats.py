"""Count the images per class and split of a dataset, chart them, and warn on imbalance.

Works on both layouts; an unsplit dataset (ROOT/CLASS/*) shows as one split
named "all". Counts are the files ImageFolder would load (by extension): run
training.data.clean to find the ones that would not decode.

Imbalance: within a split, when the largest class has more than
--imbalance-ratio times the images of the smallest, a WARNING names both. The
default 2.0 is chosen because at 1.5 the rounding of small valid/test splits
alone (2 images against 3) warns on datasets that are balanced, while at 2x the
smallest class already gets half the updates of the largest in every epoch; the
trainer's --balance sampler (or weights) evens that out.

    python -m training.data.stats --data data/mine
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from training.data.files import class_dirs, format_table, list_images, tool_parser
from training.progress import Progress

ALL = "all"  # the one split of an unsplit dataset


def count_images(root: str | Path) -> dict[str, dict[str, int]]:
    """{split: {class: images}}, with every class present (0 when missing) in every split."""
    dirs = class_dirs(root)
    bar = Progress(len(dirs), "stats: counting")
    counts: dict[str, dict[str, int]] = {}
    for i, (split, cls, d) in enumerate(dirs, 1):
        counts.setdefault(split or ALL, {})[cls] = len(list_images(d))
        bar.update(i)
    classes = sorted({c for per in counts.values() for c in per})
    return {s: {c: per.get(c, 0) for c in classes} for s, per in counts.items()}


def imbalance_warnings(counts: dict[str, dict[str, int]], max_ratio: float) -> list[str]:
    """One WARNING line per split whose largest class exceeds max_ratio x its smallest."""
    lines = []
    for split, per in counts.items():
        small = min(per, key=lambda c: (per[c], c))
        large = max(per, key=lambda c: (per[c], c))
        if len(per) < 2 or per[large] == 0:
            continue
        if per[small] == 0:
            lines.append(f"WARNING: {split}: class {small} has no images ({large} has {per[large]})")
        elif per[large] / per[small] > max_ratio:
            lines.append(
                f"WARNING: {split}: imbalanced classes: {large} has {per[large]} images, "
                f"{small} has {per[small]} ({per[large] / per[small]:.1f}x, "
                f"over {max_ratio:g}x)"
            )
    return lines


def table(counts: dict[str, dict[str, int]]) -> str:
    splits = list(counts)
    classes = sorted({c for per in counts.values() for c in per})
    rows = [[c] + [counts[s][c] for s in splits] + [sum(counts[s][c] for s in splits)] for c in classes]
    rows.append(["TOTAL"] + [sum(r[i] for r in rows) for i in range(1, len(splits) + 2)])
    header = ["class", *splits] + (["total"] if len(splits) > 1 else [])
    return format_table(header, [r if len(splits) > 1 else r[:2] for r in rows])


def draw_chart(counts: dict[str, dict[str, int]], path: Path, title: str) -> None:
    """Horizontal grouped bars, one row per class and one colour per split.

    Horizontal so that 133 class names stay readable: the figure grows in height
    with the classes instead of squeezing rotated labels.
    """
    from training.figures import Figure, save_png  # matplotlib only when a chart is drawn

    splits = list(counts)
    classes = sorted({c for per in counts.values() for c in per}, reverse=True)  # A at the top
    bar_h = 0.8 / len(splits)
    row = max(0.18, 0.08 * len(splits))  # inches per class: room for an 8 pt label
    height = max(3.0, row * len(classes) + 1.5)
    fig = Figure(figsize=(9, height), layout="tight")
    ax = fig.subplots()
    for i, s in enumerate(splits):
        shift = ((len(splits) - 1) / 2 - i) * bar_h  # the first split on top of each group
        ys = [k + shift for k in range(len(classes))]
        ax.barh(ys, [counts[s][c] for c in classes], height=bar_h, label=s)
    ax.set_yticks(range(len(classes)), classes, fontsize=8 if len(classes) > 30 else 10)
    ax.set_ylim(-0.6, len(classes) - 0.4)
    ax.set_xlabel("images")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)  # off the bars
    if len(classes) > 30:  # a tall chart: the count axis at the top as well
        ax.tick_params(axis="x", top=True, labeltop=True)
    save_png(fig, path)


def default_chart(root: Path) -> Path:
    """Beside the dataset, not inside its class folders."""
    root = root.resolve()
    return root.parent / f"{root.name}-stats.png"


def parse_args(argv=None):
    p = tool_parser("training.data.stats", __doc__)
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="dataset root: ROOT/CLASS/* or ROOT/{train,valid,test}/CLASS/*",
    )
    p.add_argument(
        "--chart", type=Path, default=None, help="bar chart PNG path (default: ROOT-stats.png beside ROOT)"
    )
    p.add_argument(
        "--json", type=Path, default=None, help="also write the counts and warnings as JSON to this path"
    )
    p.add_argument(
        "--imbalance-ratio",
        type=float,
        default=2.0,
        help="warn when a split's largest class has more than this many times "
        "the images of its smallest (default: 2.0, see below)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    counts = count_images(a.data)
    if not counts:
        raise SystemExit(f"error: no class folders in {a.data}")
    print(table(counts))
    warnings = imbalance_warnings(counts, a.imbalance_ratio)
    for w in warnings:
        print(w)
    if warnings:
        print(
            "  to compensate in training: python -m training.fit.train ... --balance sampler "
            "(or --balance weights for class-weighted loss)"
        )
    chart = a.chart or default_chart(a.data)
    draw_chart(counts, chart, f"images per class: {Path(a.data).resolve().name}")
    print(f"chart: {chart}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps(
                {
                    "root": str(a.data),
                    "counts": counts,
                    "imbalance_ratio": a.imbalance_ratio,
                    "warnings": warnings,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"json: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
