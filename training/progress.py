"""Progress of long loops (training epochs, data tools, int8 calibration), shown by tqdm:
a bar with the rate and the time left in a terminal, periodic lines in a log file, a
widget in a notebook."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """A tqdm bar of ``total`` steps labelled ``label``; ``update(done, **info)`` moves it to
    ``done`` and shows ``info`` (losses, rates) beside it, and closes it at the end."""

    def __init__(self, total: int, label: str, stream=sys.stderr):
        tty = stream.isatty()
        # In a log file every refresh is a line: one every 30 s at most.
        self.bar = tqdm(
            total=total,
            desc=label,
            file=stream,
            dynamic_ncols=tty,
            mininterval=0.1 if tty else 30.0,
            leave=True,
        )

    def update(self, done: int, **info) -> None:
        if info:
            self.bar.set_postfix(
                {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in info.items()}, refresh=False
            )
        self.bar.update(done - self.bar.n)
        if done >= self.bar.total:
            self.bar.close()
