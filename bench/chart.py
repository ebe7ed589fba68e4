"""The benchmark as a picture (<out>/throughput.png): images/s against concurrent clients,
one panel per model and photo size, one line per contestant, the in-process figure as a
dashed line. Log scales: TorchServe out of the box and the project's handler differ by
up to 40x on 2 cores, and both should stay readable.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import NullFormatter

from bench import report
from training.figures import Figure, save_png

STYLE = {
    report.SERVED: dict(color="tab:blue", marker="o", linewidth=2.5),
    report.BUILTIN: dict(color="tab:orange", marker="s"),
    report.DEFAULT: dict(color="tab:red", marker="v"),
    report.FLASK: dict(color="tab:green", marker="^"),
}


def plot(results: dict, path: Path) -> Figure:
    """Draw and save the chart; returns the figure (each line's gid is its contestant key)."""
    panels = [(name, size) for name, m in results["models"].items() for size in m["in_process"]["sizes"]]
    cols = len(results["settings"]["sizes"])
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(5.2 * cols, 3.8 * rows + 0.6))
    m = results["machine"]
    gpus = ", ".join(m.get("gpus") or []) or "no GPU"
    fig.suptitle(
        f"Images/s by concurrent clients: {m['cpu']}, {m['cores']} cores, {gpus}; "
        f"{m['date'][:16].replace('T', ' ')}"
        + (" (smoke run: not a measurement)" if results.get("smoke") else ""),
        fontsize=10,
    )
    for i, (name, size) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        model = results["models"][name]
        for key, style in STYLE.items():
            cells = model["cells"].get(key, {}).get(size)
            if cells:
                ax.plot(
                    [c["concurrency"] for c in cells],
                    [c["images_per_s"] for c in cells],
                    label=report.NAMES[key],
                    gid=key,
                    **style,
                )
        ip = model["in_process"]["sizes"][size]
        ax.axhline(
            ip["best_images_per_s"],
            color="black",
            linestyle="--",
            linewidth=1,
            gid=report.INPROCESS,
            label=f"{report.NAMES[report.INPROCESS]} (its best batch size)",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        concurrency = results["settings"]["concurrency"]
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        lo, hi = ax.get_ylim()  # plain numbers at 1, 2, 5 x 10^n, none at the minor ticks
        ticks = [k * 10.0**e for e in range(-2, 6) for k in (1, 2, 5) if lo <= k * 10.0**e <= hi]
        if len(ticks) >= 2:  # else (a narrow range: one contestant, or none) matplotlib's own
            ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{name}, {size.replace('x', '×')} JPEG", fontsize=10)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images/s")
        ax.grid(True, which="both", alpha=0.3)
    lines = {}  # one legend for all panels, every contestant once
    for ax in fig.axes:
        for line in ax.get_lines():
            lines.setdefault(line.get_gid(), line)
    fig.legend(
        list(lines.values()),
        [line.get_label() for line in lines.values()],
        loc="lower center",
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.08 if rows > 1 else 0.14, 1, 0.97))
    save_png(fig, path)
    return fig
