"""A one-line progress display for long loops, on stderr, without dependencies."""
from __future__ import annotations

import sys
import time


class Progress:
    """Rewrites one stderr line (a terminal) or prints a line every 25% (a log)."""

    def __init__(self, total: int, label: str, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()
        self._last_quarter = -1

    def update(self, done: int, **info) -> None:
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        extra = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in info.items())
        line = f"{self.label} {done}/{self.total} ({rate:.1f} it/s) {extra}".rstrip()
        if self.tty:
            self.stream.write("\r" + line.ljust(79))
            if done == self.total:
                self.stream.write("\n")
        else:
            quarter = 4 * done // max(self.total, 1)
            if quarter != self._last_quarter and quarter in (1, 2, 3):
                self.stream.write(line + "\n")
            self._last_quarter = quarter
        self.stream.flush()
