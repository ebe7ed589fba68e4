"""The training-throughput benchmark's smoke run: it measures and writes its table."""
from __future__ import annotations

import pytest

import json

from training import bench_train

pytestmark = pytest.mark.slow


def test_bench_train_smoke(tmp_path, capsys):
    bench_train.main(["--models", "mobilenet_v2", "--steps", "1", "--workers", "0", "1",
                      "--batch-size", "2", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")])
    result = json.loads((tmp_path / "o" / "train.json").read_text())
    rows = result["rows"]
    assert [(r["backbone"], r["workers"]) for r in rows] == [
        ("frozen", 0), ("frozen", 1), ("unfrozen", 0), ("unfrozen", 1)]
    for r in rows:
        assert r["loader"] > 0 and r["compute"] > 0 and r["end_to_end"] > 0
        assert r["bottleneck"] == ("data loading" if r["loader"] < r["compute"] else "compute")
    md = (tmp_path / "o" / "train.md").read_text()
    assert md.count("| mobilenet_v2 |") == 4 and md in capsys.readouterr().out
    assert len(list((tmp_path / "d").glob("train/*/*.jpg"))) == 4  # batch x (steps + 1)


def test_frozen_backbone_trains_only_the_head():
    from models.zoo import get_model
    m = get_model("resnet50", 5)
    bench_train.set_backbone(m, "fc", trainable=False)
    assert {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad} == {"fc"}
    bench_train.set_backbone(m, "fc", trainable=True)
    assert all(p.requires_grad for p in m.parameters())
