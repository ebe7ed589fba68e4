"""Training, checkpoint, export and the demo data generator."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import CLASSES
from training import train as train_mod
from training.demo_data import generate


def test_demo_data_is_deterministic_and_split(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    counts = generate(a, per_class=10, classes=("circle", "star"), seed=3, quiet=True)
    generate(b, per_class=10, classes=("circle", "star"), seed=3, quiet=True)
    generate(c, per_class=10, classes=("circle", "star"), seed=4, quiet=True)
    assert counts == {"train": 14, "valid": 4, "test": 2}
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 20
    assert {p.parts[1] for p in files} == {"circle", "star"}
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_training_prints_epochs_and_test_accuracy(tiny_data, tmp_path, capsys):
    a = train_mod.parse_args(["--model", "scratch_cnn", "--data", str(tiny_data), "--out",
                              str(tmp_path), "--epochs", "2", "--batch-size", "8",
                              "--workers", "0", "--lr", "0.005"])
    te = train_mod.run(a)
    out = capsys.readouterr().out
    assert re.search(r"^Epoch 1: train loss [\d.]+ acc [\d.]+% \| valid loss [\d.]+ acc [\d.]+%", out, re.M)
    assert re.search(r"^Epoch 2: ", out, re.M)
    assert re.search(r"^Test Loss: \d+\.\d+$", out, re.M)
    m = re.search(r"^Test Accuracy: (\d+)% \((\d+)/(\d+)\)$", out, re.M)
    assert m and int(m.group(3)) == len(CLASSES) * 2 == te["total"]
    assert int(m.group(2)) == te["correct"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"]["correct"] == te["correct"] and len(metrics["history"]) == 2
    best = min(metrics["history"], key=lambda h: h["valid"]["loss"])
    assert metrics["best_epoch"] == best["epoch"]


def test_checkpoint_describes_itself(trained, tiny_data):
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    assert ckpt["model"] == "scratch_cnn"
    assert ckpt["classes"] == sorted(CLASSES) and ckpt["num_classes"] == 3
    assert ckpt["eval_preset"]["resize_size"] == 256 and ckpt["eval_preset"]["crop_size"] == 224
    assert ckpt["args"]["data"] == str(tiny_data) and ckpt["args"]["weights"] is None
    model, _ = train_mod.load_checkpoint(trained)
    assert model.classifier[-1].out_features == 3


def test_export_writes_torchscript_labels_and_model_config(exported, trained):
    labels = json.loads((exported / "index_to_name.json").read_text())
    assert labels == {"0": "circle", "1": "square", "2": "triangle"}
    cfg = yaml.safe_load((exported / "model-config.yaml").read_text())
    assert cfg["batchSize"] == 8 and cfg["maxBatchDelay"] == 300
    assert cfg["minWorkers"] == cfg["maxWorkers"] == 1 and cfg["responseTimeout"] > 0
    h = cfg["handler"]
    assert (h["resize_size"], h["crop_size"], h["top_k"]) == (256, 224, 3)
    assert h["mean"] == [0.485, 0.456, 0.406] and h["std"] == [0.229, 0.224, 0.225]
    eager, _ = train_mod.load_checkpoint(trained)
    scripted = torch.jit.load(str(exported / "model.pt"))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert (scripted(x) - eager(x)).abs().max() < 1e-4


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def test_cli_unknown_model_lists_known_ones(tiny_data, tmp_path):
    r = run_cli("training.train", "--model", "resnet5", "--data", str(tiny_data), "--out", str(tmp_path))
    assert r.returncode != 0
    assert "unknown model 'resnet5'; known: mobilenet_v2, resnet50, scratch_cnn" in r.stderr


def test_cli_missing_split_is_one_line(tmp_path, tiny_data):
    (tmp_path / "train" / "a").mkdir(parents=True)
    shutil.copy(next(tiny_data.glob("train/circle/*.jpg")), tmp_path / "train" / "a")
    r = run_cli("training.train", "--model", "scratch_cnn", "--data", str(tmp_path),
                "--out", str(tmp_path / "out"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "valid is missing" in r.stderr


@pytest.mark.parametrize("weights", ["DEFAULT"])
def test_cli_offline_weights_error_names_weights_file(tiny_data, tmp_path, weights):
    from tests.test_models import closed_port
    proxy = f"http://127.0.0.1:{closed_port()}"
    env = {"TORCH_HOME": str(tmp_path), "HTTPS_PROXY": proxy, "https_proxy": proxy,
           "HTTP_PROXY": proxy, "http_proxy": proxy, "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "training.train", "--model", "mobilenet_v2",
                        "--data", str(tiny_data), "--out", str(tmp_path / "o"), "--weights", weights,
                        "--workers", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "--weights-file" in r.stderr
