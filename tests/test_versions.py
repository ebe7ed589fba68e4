"""Model versions through the management API, with traffic during every switch."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from serving.archive import SUMS_FILE, build_archive
from serving.server import LocalServer
from serving.versions import default_version, retire, rollout, versions
from tests.conftest import MODEL_NAME, split_images

pytestmark = pytest.mark.torchserve

# Version 2.0's batch delay: requests sent to it alone wait this long in its worker's batch,
# a window wide enough to retire it in on any machine.
V2_BATCH_DELAY_MS = 2000


def received(client, model: str, version: str) -> float:
    """Requests TorchServe has received for ``version``: ts_inference_requests_total counts
    a request on arrival. (The describe's pendingRequests stays 0 here: an idle worker takes
    each request into the batch it is forming at once.)"""
    key = f'ts_inference_requests_total{{model_name="{model}",model_version="{version}"'
    return sum(v for k, v in client.metrics().items() if k.startswith(key))


def wait_until_received(client, model: str, version: str, n: float, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while received(client, model, version) < n:
        assert time.monotonic() < deadline, f"{model} {version} never received {n} requests"
        time.sleep(0.01)


def test_rollout_rollback_retire_under_traffic(exported, model_store, tmp_path, tiny_data):
    store = tmp_path / "store"
    store.mkdir()
    for f in (f"{MODEL_NAME}.mar", SUMS_FILE):
        shutil.copy(model_store / f, store)
    # Version 2.0 answers with top-2 instead of top-3, so answers tell the versions apart.
    v2 = tmp_path / "export_v2"
    shutil.copytree(exported, v2)
    cfg = yaml.safe_load((v2 / "model-config.yaml").read_text())
    cfg["handler"]["top_k"] = 2
    cfg["maxBatchDelay"] = V2_BATCH_DELAY_MS
    (v2 / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    mar_v2 = build_archive(v2, MODEL_NAME, store, version="2.0")
    assert mar_v2.name == f"{MODEL_NAME}_v2.0.mar"

    body = split_images(tiny_data)[0].read_bytes()
    with LocalServer(store, tmp_path / "ts", {"load_models": ""}) as client:
        client.register(f"{MODEL_NAME}.mar")
        seen, failures, stop = [], [], threading.Event()

        def traffic():
            while not stop.is_set():
                r = client.predict_response(MODEL_NAME, body)
                (seen if r.status_code == 200 else failures).append(
                    len(r.json()["top_k"]) if r.status_code == 200 else r.status_code
                )

        threads = [threading.Thread(target=traffic) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            assert rollout(client, MODEL_NAME, mar_v2) == "2.0"
            assert default_version(client, MODEL_NAME) == "2.0"
            assert len(client.predict(MODEL_NAME, body)["top_k"]) == 2
            client.set_default(MODEL_NAME, "1.0")  # roll back
            assert len(client.predict(MODEL_NAME, body)["top_k"]) == 3
            # Requests that 2.0 still holds when it is retired are answered, not dropped:
            # these wait in its batch (V2_BATCH_DELAY_MS) while retire runs.
            before = received(client, MODEL_NAME, "2.0")
            with ThreadPoolExecutor(3) as ex:
                held = [ex.submit(client.predict_response, f"{MODEL_NAME}/2.0", body) for _ in range(3)]
                wait_until_received(client, MODEL_NAME, "2.0", before + 3)
                assert not any(f.done() for f in held)  # held by 2.0 as retire starts
                retire(client, MODEL_NAME, "2.0")
                answers = [f.result() for f in held]
            assert [r.status_code for r in answers] == [200] * 3
            assert [len(r.json()["top_k"]) for r in answers] == [2] * 3
            assert [v["version"] for v in versions(client, MODEL_NAME)] == ["1.0"]
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert failures == []
        assert {2, 3} <= set(seen)  # traffic was served by both versions during the switch
