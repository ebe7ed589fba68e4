"""Distributed data parallel: two CPU processes on gloo learn what one process learns.

The trainer splits the global batch across processes and draws samples and
augmentations from (seed, epoch, index) alone, so with a model without BatchNorm
and without dropout the two runs differ only by the order of float additions.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.zoo import get_model
from training.fit import train as train_mod

ARGS = [
    "--model",
    "scratch_cnn",
    "--dropout",
    "0",
    "--batch-size",
    "10",
    "--epochs",
    "2",
    "--optimizer",
    "sgd",
    "--lr",
    "0.005",
    "--workers",
    "0",
    "--no-analysis",
    "--weights",
    "none",
]

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (Linux /proc). torchrun starts each worker in a
    session of its own, so a process group or session does not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def torchrun(processes: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """training.fit.train under torchrun. A run that outlives ``timeout`` (it takes ~15 s)
    fails the test with every process's Python stack (faulthandler on SIGABRT), and
    leaves no process behind."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(processes),
            "-m",
            "training.fit.train",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    pids = [p.pid]
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pids = _descendants(p.pid)
        for pid in reversed(pids):  # each Python process prints where it stands, in turn
            _signal([pid], signal.SIGABRT)
            time.sleep(0.5)
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            _signal(pids, signal.SIGKILL)
            out, err = p.communicate()
        raise AssertionError(
            f"torchrun ran over {timeout} s; its processes' stacks:\n{err[-12000:]}\nstdout:\n{out[-2000:]}"
        ) from None
    finally:
        _signal(pids, signal.SIGKILL)  # nothing outlives the test
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_two_gloo_processes_learn_what_one_process_learns(tiny_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train_mod.run(train_mod.parse_args([*ARGS, "--data", str(tiny_data), "--out", str(one)]))
    r = torchrun(2, [*ARGS, "--data", str(tiny_data), "--out", str(two)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stdout
    assert r.stdout.count("Test Accuracy") == 1  # only rank 0 reports
    a = torch.load(one / "last.pt", weights_only=True)["model"]
    b = torch.load(two / "last.pt", weights_only=True)["model"]
    torch.manual_seed(0)
    init = get_model("scratch_cnn", 3, dropout=0.0).state_dict()  # the runs' starting point
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # both really trained
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(a[k].abs().max().item() for k in a)
    # Averaged gradients are summed in another order than one process's: float32 rounding,
    # about 1e-7 of the weights per step, far below 1e-5 after these few steps; a lost or
    # doubled gradient moves the weights by the learning rate's whole step.
    assert diff < 1e-5 * scale, f"weights differ by {diff:.2e} (scale {scale:.3g})"
    ha = json.loads((one / "metrics.json").read_text())["history"]
    hb = json.loads((two / "metrics.json").read_text())["history"]
    for x, y in zip(ha, hb, strict=True):
        # Losses of weights that agree within 1e-5 of their scale agree within 1e-4 of themselves.
        assert math.isclose(x["train"]["loss"], y["train"]["loss"], rel_tol=1e-4)
        assert math.isclose(x["valid"]["loss"], y["valid"]["loss"], rel_tol=1e-4)
        assert x["train"]["total"] == y["train"]["total"] == 30
