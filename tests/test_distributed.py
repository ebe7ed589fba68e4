"""Distributed data parallel: two CPU processes on gloo learn what one process learns.

The trainer splits the global batch across processes and draws samples and
augmentations from (seed, epoch, index) alone, so with a model without BatchNorm
and without dropout the two runs differ only by the order of float additions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from models.registry import get_model
from training import train as train_mod

ARGS = ["--model", "scratch_cnn", "--dropout", "0", "--batch-size", "10", "--epochs", "2",
        "--optimizer", "sgd", "--lr", "0.005", "--workers", "0", "--no-analysis", "--weights", "none"]


def test_two_gloo_processes_learn_what_one_process_learns(tiny_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train_mod.run(train_mod.parse_args([*ARGS, "--data", str(tiny_data), "--out", str(one)]))
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", "-m", "training.train", *ARGS,
                        "--data", str(tiny_data), "--out", str(two)],
                       capture_output=True, text=True, timeout=600, env=env)
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
    assert diff < 1e-5 * scale, f"weights differ by {diff:.2e}"
    ha = json.loads((one / "metrics.json").read_text())["history"]
    hb = json.loads((two / "metrics.json").read_text())["history"]
    for x, y in zip(ha, hb, strict=True):
        assert abs(x["train"]["loss"] - y["train"]["loss"]) < 1e-4
        assert abs(x["valid"]["loss"] - y["valid"]["loss"]) < 1e-4
        assert x["train"]["total"] == y["train"]["total"] == 30
