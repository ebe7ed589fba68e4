"""The training-throughput benchmark's smoke run: it measures and writes its table."""

from __future__ import annotations

import json

import pytest

from bench import train as bench_train


@pytest.mark.slow
def test_bench_train_smoke(tmp_path, capsys):
    bench_train.main(
        [
            "--models",
            "mobilenet_v2",
            "--steps",
            "1",
            "--workers",
            "0",
            "1",
            "--batch-size",
            "2",
            "--data",
            str(tmp_path / "d"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    result = json.loads((tmp_path / "o" / "train.json").read_text())
    rows = result["rows"]
    assert [(r["backbone"], r["workers"]) for r in rows] == [
        ("frozen", 0),
        ("frozen", 1),
        ("unfrozen", 0),
        ("unfrozen", 1),
    ]
    for r in rows:
        assert r["loader"] > 0 and r["compute"] > 0 and r["end_to_end"] > 0
        assert r["bottleneck"] == ("data loading" if r["loader"] < r["compute"] else "compute")
    md = (tmp_path / "o" / "train.md").read_text()
    assert md in capsys.readouterr().out
    # The table shows the results' own figures, row by row.
    table_rows = [line for line in md.splitlines() if line.startswith("| mobilenet_v2 |")]
    assert table_rows == [
        f"| mobilenet_v2 | {r['backbone']} | {r['workers']} | {r['loader']:.1f} | "
        f"{r['compute']:.1f} | {r['end_to_end']:.1f} | {r['bottleneck']} |"
        for r in rows
    ]
    # One loader rate per worker count, shared by both backbones; one compute rate per backbone.
    for r in rows:
        assert r["loader"] == next(o["loader"] for o in rows if o["workers"] == r["workers"])
        assert r["compute"] == next(o["compute"] for o in rows if o["backbone"] == r["backbone"])
    assert len(list((tmp_path / "d").glob("train/*/*.jpg"))) == 4  # batch x (steps + 1)


def test_frozen_backbone_trains_only_the_head():
    from models.zoo import get_model

    m = get_model("resnet50", 5)
    bench_train.set_backbone(m, "fc", trainable=False)
    assert {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad} == {"fc"}
    bench_train.set_backbone(m, "fc", trainable=True)
    assert all(p.requires_grad for p in m.parameters())


def test_rate_counts_the_measured_steps_images_and_not_the_warm_up(monkeypatch):
    """On a clock that each step moves by 0.5 s, 3 steps of 4 images take 1.5 s: 8 images/s
    exactly. Counting the warm-up step, or steps instead of images, gives another figure."""
    clock = [100.0]
    monkeypatch.setattr(bench_train.time, "perf_counter", lambda: clock[0])
    steps = []

    def step(x, y):
        steps.append((x, y))
        clock[0] += 0.5

    batches = iter([(i, i) for i in range(10)])
    assert bench_train.rate(batches, step, steps=3, batch=4, label="t") == 8.0
    assert steps == [(i, i) for i in range(4)]  # the warm-up batch, then the 3 measured
