"""KServe's protocols through TorchServe's envelopes, against real servers.

TorchServe's KServe envelopes read only the first request of a batch, so these
servers register the model with batch_size 1 (measured: with batchSize 8,
concurrent requests all failed with 503); a request batches by carrying several
instances.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serving.server import LocalServer
from tests.conftest import MODEL_NAME, assert_answer_matches, distinguishable, split_images

pytestmark = pytest.mark.torchserve


@pytest.fixture(scope="module", params=["kservev2", "kserve"])
def envelope_server(request, model_store, tmp_path_factory):
    ts = LocalServer(
        model_store,
        tmp_path_factory.mktemp(request.param),
        {"service_envelope": request.param, "load_models": ""},
    )
    with ts as client:
        client.register(f"{MODEL_NAME}.mar", batch_size=1)
        yield request.param, client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def call(envelope: str, client, images: list[bytes]) -> tuple[int, list]:
    """POST in the envelope's protocol; returns (status, one answer per image)."""
    headers = {"Authorization": f"Bearer {client.keys()['inference']}"}
    if envelope == "kservev2":
        url = f"{client.inference_url}/v2/models/{MODEL_NAME}/infer"
        body = {
            "id": "req-1",
            "inputs": [
                {"name": f"image-{i}", "shape": [1], "datatype": "BYTES", "data": [b64(img)]}
                for i, img in enumerate(images)
            ],
        }
        r = requests.post(url, json=body, headers=headers, timeout=60)
        out = r.json()
        assert out["id"] == "req-1" and out["model_name"] == MODEL_NAME
        assert [o["name"] for o in out["outputs"]] == [f"image-{i}" for i in range(len(images))]
        assert all(o["datatype"] == "BYTES" for o in out["outputs"])
        return r.status_code, [json.loads(o["data"][0]) for o in out["outputs"]]
    url = f"{client.inference_url}/v1/models/{MODEL_NAME}:predict"
    r = requests.post(
        url, json={"instances": [{"data": b64(img)} for img in images]}, headers=headers, timeout=60
    )
    return r.status_code, r.json()["predictions"]


def test_one_image_gets_the_plain_api_answer(envelope_server, tiny_data, reference):
    envelope, client = envelope_server
    img = split_images(tiny_data)[0].read_bytes()
    status, answers = call(envelope, client, [img])
    assert status == 200 and len(answers) == 1
    assert_answer_matches(answers[0], reference.expected(img))


def test_several_instances_with_a_bad_one(envelope_server, tiny_data, reference):
    envelope, client = envelope_server
    imgs = [p.read_bytes() for p in split_images(tiny_data)[:2]]
    status, answers = call(envelope, client, [imgs[0], b"not an image", imgs[1]])
    assert status == 200
    assert answers[1]["code"] == 400 and "not a decodable image" in answers[1]["message"]
    for answer, img in zip((answers[0], answers[2]), imgs):
        assert_answer_matches(answer, reference.expected(img))


def test_concurrent_requests_each_get_their_own_answer(envelope_server, tiny_data, reference):
    """Images whose answers all differ, sent at once: an answer given to another request
    than the one whose image it classified fails its comparison."""
    envelope, client = envelope_server
    imgs = distinguishable([p.read_bytes() for p in split_images(tiny_data)], reference)
    with ThreadPoolExecutor(len(imgs)) as ex:
        results = list(ex.map(lambda img: call(envelope, client, [img]), imgs))
    assert [s for s, _ in results] == [200] * len(imgs)
    for (_, answers), img in zip(results, imgs):
        assert len(answers) == 1
        assert_answer_matches(answers[0], reference.expected(img))


@pytest.mark.parametrize("envelope_server", ["kserve"], indirect=True)  # v2 has no explain call
def test_kserve_v1_explain_answers_each_instance_with_its_map(envelope_server, tiny_data):
    """KServe v1's :explain: every instance gets the answer :predict gives, with its map."""
    envelope, client = envelope_server
    imgs = [p.read_bytes() for p in sorted(tiny_data.glob("test/*/*.jpg"))[:2]]
    headers = {"Authorization": f"Bearer {client.keys()['inference']}"}
    body = {"instances": [{"data": b64(img)} for img in imgs]}
    r = requests.post(
        f"{client.inference_url}/v1/models/{MODEL_NAME}:explain", json=body, headers=headers, timeout=60
    )
    assert r.status_code == 200, r.text
    explained = r.json()["explanations"]
    _, predicted = call(envelope, client, imgs)
    assert [a["top_k"] for a in explained] == [a["top_k"] for a in predicted]
    for a in explained:
        e = a["explanation"]
        assert e["method"] == "grad-cam" and e["label"] == a["top_k"][0]["label"]
        assert max(max(row) for row in e["grid"]) == 1.0
