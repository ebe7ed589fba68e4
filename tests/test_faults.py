"""Faults and load against a real TorchServe: a killed worker, a restart, a short soak."""
from __future__ import annotations

import json

from serving.server import LocalServer
from serving.soak import soak
from tests.conftest import MODEL_NAME, split_images


def images(tiny_data) -> list[bytes]:
    return [p.read_bytes() for p in split_images(tiny_data, "train")]


def test_short_soak_has_no_errors_and_stable_worker_memory(server, tiny_data):
    report = soak(server, MODEL_NAME, images(tiny_data), seconds=8, concurrency=8, warmup_s=3)
    print(json.dumps(report))
    assert report["requests"] > 20
    assert report["statuses"] == {"200": report["requests"]}
    assert report["errors"] == {}
    assert report["lost"] == 0 and report["hung_clients"] == 0
    assert report["worker_pids"]["start"] == report["worker_pids"]["end"]
    rss = report["worker_rss_mb"]
    assert rss["after_warmup"] > 50  # a real worker process was measured
    assert rss["growth_pct"] < 10, rss


def test_killed_worker_is_replaced_and_only_its_batch_is_lost(server, tiny_data):
    batch_size = server.describe(MODEL_NAME)[0]["batchSize"]
    report = soak(server, MODEL_NAME, images(tiny_data), seconds=10, concurrency=16,
                  warmup_s=1, kill_worker_after=3)
    print(json.dumps(report))  # the lost count is part of the report
    killed, end = report["worker_pids"]["killed"], report["worker_pids"]["end"]
    assert killed and end and killed not in end  # TorchServe started a new worker
    assert report["hung_clients"] == 0  # nobody waited past the response timeout
    # The batch in flight is answered "Worker died.": 507 when TorchServe has already seen
    # the exit code 137 (SIGKILL), 500 when the worker's socket closed first (a race).
    assert set(report["statuses"]) <= {"200", "500", "507"}, report["statuses"]
    lost = report["lost"]
    assert report["errors"] == ({"Worker died.": lost} if lost else {}), report["errors"]
    assert lost <= batch_size
    assert report["statuses"]["200"] > lost
    # After recovery every request succeeds.
    for body in images(tiny_data)[:8]:
        assert server.predict(MODEL_NAME, body)["top_k"]


def test_models_come_back_after_stop_and_start(model_store, tmp_path, tiny_data):
    body = split_images(tiny_data)[0].read_bytes()
    ts = LocalServer(model_store, tmp_path)  # the shipped config: load_models=all
    try:
        client = ts.start()
        first = client.predict(MODEL_NAME, body)
        ts.stop()
        client = ts.start()
        assert [m["modelName"] for m in client.models()] == [MODEL_NAME]
        assert client.describe(MODEL_NAME)[0]["batchSize"] == 8  # as configured in the archive
        assert client.predict(MODEL_NAME, body) == first
    finally:
        ts.stop()
