"""Figures through matplotlib's object API (``Figure`` + Agg canvas), not pyplot: no
global figure state, nothing to close, no display needed, safe in threads. Every
PNG the project draws (training analysis, data statistics, the benchmark's chart)
is saved here."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["Figure", "save_png"]


def save_png(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` (its folder created); returns ``path``."""
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
