"""End to end against a real TorchServe on loopback: the tiny model trained, exported and
archived by the fixtures, registered through the management API with the token."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serving.client import TorchServeError
from serving.server import LocalServer
from tests.conftest import MODEL_NAME, assert_answer_matches, assert_same_answer, split_images

pytestmark = pytest.mark.torchserve


def predict_all(client, payloads, multipart=False):
    """Send every payload at once from its own thread; returns the responses in order."""
    with ThreadPoolExecutor(len(payloads)) as ex:
        return list(ex.map(lambda b: client.predict_response(MODEL_NAME, b, multipart), payloads))


def test_registered_with_archive_batch_settings(server):
    desc = server.describe(MODEL_NAME)[0]
    assert desc["batchSize"] == 8 and desc["maxBatchDelay"] == 300
    assert [w["status"] for w in desc["workers"]] == ["READY"]


def test_concurrent_predictions_are_batched_and_correct(server, tiny_data, reference):
    images = split_images(tiny_data) + split_images(tiny_data, "valid")[:6]
    payloads = [p.read_bytes() for p in images]
    responses = predict_all(server, payloads)
    assert [r.status_code for r in responses] == [200] * len(payloads)
    assert {r.headers["Content-Type"] for r in responses} == {"application/json"}
    for r, body in zip(responses, payloads):
        assert_answer_matches(r.json(), reference.expected(body))
    # The answers depend on the image, so a handler that mixed up a batch would be caught.
    top = [r.json()["top_k"][0]["probability"] for r in responses]
    assert len(set(top)) > len(top) // 2, top
    sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    # Several requests went through one forward call, as the server reports it.
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8


def test_raw_body_and_multipart_give_the_same_answer(server, tiny_data):
    body = split_images(tiny_data)[0].read_bytes()
    assert server.predict(MODEL_NAME, body) == server.predict(MODEL_NAME, body, multipart=True)


def test_bad_request_in_a_batch_gets_400_and_the_others_their_answers(server, tiny_data, reference):
    good = [p.read_bytes() for p in split_images(tiny_data)[:4]]
    alone = [server.predict(MODEL_NAME, b) for b in good]
    bad = [b"this is plain text", good[0][: len(good[0]) // 3]]  # text, truncated JPEG
    payloads = [good[0], bad[0], good[1], good[2], bad[1], good[3]]
    responses = predict_all(server, payloads)
    codes = [r.status_code for r in responses]
    assert codes == [200, 400, 200, 200, 400, 200]
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1
    for r in (responses[1], responses[4]):
        body = r.json()
        assert body["code"] == 400 and body["type"] == "BadImage" and body["message"]
    got = [responses[i].json() for i in (0, 2, 3, 5)]
    for g, a, image in zip(got, alone, good):
        assert_same_answer(g, a, reference.expected(image).tolerance)
    # The worker survived: it still answers.
    assert server.predict(MODEL_NAME, good[0])["top_k"][0]["label"] == alone[0]["top_k"][0]["label"]


def test_requests_without_or_with_a_wrong_token_are_refused(server, tiny_data):
    body = split_images(tiny_data)[0].read_bytes()
    url = f"{server.inference_url}/predictions/{MODEL_NAME}"
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        r = requests.post(url, data=body, headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
        r = requests.get(f"{server.management_url}/models", headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
    # The inference key is not a management key.
    inference_key = server.keys()["inference"]
    r = requests.get(
        f"{server.management_url}/models", headers={"Authorization": f"Bearer {inference_key}"}, timeout=30
    )
    assert r.status_code == 400


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/model.mar",
        "https://example.com/model.mar",
        "file:///etc/passwd",
    ],
)
def test_registration_only_from_the_local_model_store(server, url):
    with pytest.raises(TorchServeError) as e:
        server.register(url)
    assert e.value.status == 404
    assert "does not match any allowed URL" in e.value.body["message"]
    assert MODEL_NAME in {m["modelName"] for m in server.models()}


def test_expired_keys_are_replaced_by_the_client(model_store, tmp_path):
    # A server whose keys live 3 seconds; the client fetches fresh ones with the API key.
    with LocalServer(model_store, tmp_path, {"token_expiration_min": "0.05"}) as client:
        old = client.keys()

        def ping_with_old_key() -> requests.Response:
            return requests.get(
                f"{client.inference_url}/ping",
                headers={"Authorization": f"Bearer {old['inference']}"},
                timeout=30,
            )

        # Waits for the server to refuse the key, however long its start took; a minute is
        # twenty lifetimes of a key.
        deadline = time.monotonic() + 60
        while (r := ping_with_old_key()).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException", r.text
        # Concurrent callers that all hold the expired key share one fresh key.
        with ThreadPoolExecutor(8) as ex:
            assert [p["status"] for p in ex.map(lambda _: client.ping(), range(8))] == ["Healthy"] * 8
        # load_models=all served the store's archive without any registration call.
        assert [m["modelName"] for m in client.models()] == [MODEL_NAME]
        new = client.keys()
        assert new["inference"] != old["inference"] and new["management"] != old["management"]
        assert json.loads((tmp_path / "key_file.json").read_text())["API"]["key"] == old["API"]
