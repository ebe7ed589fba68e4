"""Faults and load against a real TorchServe: a killed worker, a restart, a short soak."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from serving.archive import build_archive
from serving.logs import LoadWatch, ModelLoadError
from serving.server import LocalServer, free_port
from serving.soak import soak
from tests.conftest import MODEL_NAME, split_images

pytestmark = pytest.mark.torchserve


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
    report = soak(
        server, MODEL_NAME, images(tiny_data), seconds=10, concurrency=16, warmup_s=1, kill_worker_after=3
    )
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


def test_a_model_that_cannot_load_stops_the_start_with_its_error(exported, tmp_path):
    """TorchServe retries a model whose workers die at load for ever; the start stops after
    a few failures with the handler's own error, and leaves no process behind."""
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    cfg = yaml.safe_load((broken / "model-config.yaml").read_text())
    cfg["handler"]["optimize"] = "bogus"
    (broken / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    build_archive(broken, "broken", tmp_path / "store")
    ts = LocalServer(tmp_path / "store", tmp_path / "ts", start_timeout=600)  # load_models=all
    with pytest.raises(
        ModelLoadError, match=r"workers of broken died [3-9] times .*ValueError: .*optimize 'bogus'"
    ):
        ts.start()
    assert ts.processes() == []


def _log_line(model: str, text: str, log: str) -> str:
    thread = f"W-9000-{model}_1.0" + ("-stdout MODEL_LOG" if log == "model" else " org.x")
    return f"2026-11-21T20:26:47,986 [INFO ] {thread} - {text}\n"


def write_failure(logs, model: str, error: str) -> None:
    with open(logs / "model_log.log", "a") as f:
        f.write(_log_line(model, "Traceback (most recent call last):", "model"))
        f.write(_log_line(model, error, "model"))
        f.write(_log_line(model, "Backend worker process died.", "model"))
    with open(logs / "ts_log.log", "a") as f:
        f.write(_log_line(model, f"Load model failed: {model}, error: Worker died.", "ts"))


def test_load_watch_counts_only_new_failures_and_names_the_models_own_error(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    for _ in range(5):  # an earlier server's failures in the same folder
        write_failure(logs, "fly", "OldError: from before")
    watch = LoadWatch(logs, failures=3)
    write_failure(logs, "fly", "KeyError: 'mean'")
    write_failure(logs, "dog", "RuntimeError: out of memory")
    write_failure(logs, "fly", "KeyError: 'std'")
    assert watch.failure() is None  # fly has failed twice since, dog once
    write_failure(logs, "fly", "KeyError: 'top_k'")
    write_failure(logs, "dog", "RuntimeError: still out of memory")  # the last error logged
    cause = watch.failure()
    assert cause.startswith("the workers of fly died 3 times")
    assert "last error: KeyError: 'top_k'" in cause
    with pytest.raises(ModelLoadError, match="fly died 3 times"):
        watch.check()
    # `make serve` waits with the same watch: the client stops early with the cause. It
    # watches from when it starts, so failures are written until it has seen enough.
    free = f"http://127.0.0.1:{free_port()}"
    client = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.client",
            "--inference-url",
            free,
            "--management-url",
            free,
            "--key-file",
            str(tmp_path / "none.json"),
            "wait",
            "--for",
            "600",
            "--logs",
            str(logs),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(240):
            write_failure(logs, "dog", "RuntimeError: no kernel image")
            if client.poll() is not None:
                break
            time.sleep(0.5)
        out, err = client.communicate(timeout=10)
    finally:
        client.kill()
    assert client.returncode == 1, (out, err)
    assert "error: the workers of dog died" in err
    assert "last error: RuntimeError: no kernel image" in err
