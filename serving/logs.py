"""Read TorchServe's logs for a model whose workers keep dying while loading it.

TorchServe retries such a model for ever, with pauses of about 10 s, and its APIs
say only that the workers are not READY; the cause is a Python traceback in
logs/model_log.log. Whoever waits for the server (``LocalServer``, ``make serve``)
watches the logs with ``LoadWatch`` and stops with that cause after a few failures
instead of waiting out its timeout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

LOAD_FAILURES = 3  # one failure can be bad luck (memory); three in a row are the model
LOAD_FAILED = re.compile(r"Load model failed: (\S+), error:")
PY_ERROR = re.compile(r"MODEL_LOG - ([\w.]*(?:Error|Exception)\b.*)$")
LOGS = ("ts_log.log", "model_log.log")


class ModelLoadError(RuntimeError):
    """A model's workers kept dying while loading it."""


class LoadWatch:
    """Watches the lines TorchServe writes to ``logs`` from now on (the folder may hold
    earlier servers' lines)."""

    def __init__(self, logs: Path, failures: int = LOAD_FAILURES):
        self.logs = Path(logs)
        self.failures = failures
        self.offsets = {name: _size(self.logs / name) for name in LOGS}

    def _new(self, name: str) -> str:
        try:
            with open(self.logs / name, "rb") as f:
                offset = self.offsets[name]
                if os.fstat(f.fileno()).st_size < offset:  # rolled over
                    offset = 0
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def failure(self) -> str | None:
        """Why a model could not load, once its workers have died ``failures`` times
        while loading it; None until then."""
        failed = LOAD_FAILED.findall(self._new("ts_log.log"))
        model = next((m for m in dict.fromkeys(failed) if failed.count(m) >= self.failures), None)
        if model is None:
            return None
        errors = [
            m.group(1)
            for line in self._new("model_log.log").splitlines()
            if f"-{model}_" in line and (m := PY_ERROR.search(line))
        ]
        last = errors[-1] if errors else "none logged"
        return (
            f"the workers of {model} died {failed.count(model)} times while loading it; "
            f"the last error: {last} (the whole traceback: {self.logs / 'model_log.log'})"
        )

    def check(self) -> None:
        """Raise ModelLoadError if a model cannot load."""
        cause = self.failure()
        if cause:
            raise ModelLoadError(cause)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
