"""The KServe layout and manifests: checked against KServe's documented fields, and the
generated config started for real (on loopback) to prove TorchServe serves from it."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from serving.archive import SUMS_FILE, sha256
from serving.kserve import layout
from serving.server import ROOT, LocalServer, read_properties
from tests.conftest import MODEL_NAME, assert_answer_matches, distinguishable, split_images

pytestmark = pytest.mark.torchserve


@pytest.fixture(scope="module")
def package(model_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("kserve") / "kserve"
    return layout(model_store, out, image="registry.example/ic:1", storage_uri="pvc://models/ic")


def test_storage_layout_is_what_the_torchserve_runtime_expects(package, model_store):
    assert (package / "config" / "config.properties").is_file()
    mars = sorted(p.name for p in (package / "model-store").glob("*.mar"))
    assert mars == [f"{MODEL_NAME}.mar"]
    assert sha256(package / "model-store" / mars[0]) == sha256(model_store / mars[0])
    assert (package / "model-store" / SUMS_FILE).is_file()
    cfg = read_properties(package / "config" / "config.properties")
    assert cfg["model_store"] == "/mnt/models/model-store"
    assert cfg["inference_address"] == "http://0.0.0.0:8085"
    assert cfg["metrics_address"] == "http://0.0.0.0:8082" and cfg["metrics_mode"] == "prometheus"
    assert cfg["enable_envvars_config"] == "true" and cfg["service_envelope"] == "kservev2"
    snap = json.loads(cfg["model_snapshot"])
    entry = snap["models"][MODEL_NAME]["1.0"]
    assert snap["modelCount"] == 1 and entry["marName"] == f"{MODEL_NAME}.mar"
    assert entry["defaultVersion"] is True and entry["batchSize"] == 1


def test_manifests_use_kserve_fields(package):
    isvc = yaml.safe_load((package / "inferenceservice.yaml").read_text())
    rt = yaml.safe_load((package / "servingruntime.yaml").read_text())
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] == "v2"
    assert model["storageUri"] == "pvc://models/ic" and model["runtime"] == rt["metadata"]["name"]
    assert (rt["apiVersion"], rt["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    assert {"name": "pytorch", "version": "1", "autoSelect": False} in rt["spec"]["supportedModelFormats"]
    c = rt["spec"]["containers"][0]
    assert c["name"] == "kserve-container" and c["image"] == "registry.example/ic:1"
    assert "--ts-config=/mnt/models/config/config.properties" in c["args"]
    assert "--model-store=/mnt/models/model-store" in c["args"]
    # The project's quieter logging, shipped in the package and named as the pod runs it.
    assert "--log-config=/mnt/models/config/log4j2.xml" in c["args"]
    assert (package / "config" / "log4j2.xml").read_bytes() == (ROOT / "serving" / "log4j2.xml").read_bytes()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--log-config=/mnt/models/config/log4j2.xml" in dockerfile
    assert {"name": "TS_SERVICE_ENVELOPE", "value": "{{.Labels.serviceEnvelope}}"} in c["env"]


def test_torchserve_serves_from_the_generated_config(package, tmp_path, tiny_data, reference):
    """Concurrent v2 requests, each answered for its own image (answers that differ per
    image, so one handed to another request fails)."""
    # The pod's paths and ports, moved to this machine's loopback; the rest as generated.
    overrides = {"metrics_config": str(package / "config" / "metrics.yaml")}
    ts = LocalServer(
        package / "model-store",
        tmp_path,
        overrides,
        base_config=package / "config" / "config.properties",
        log_config=package / "config" / "log4j2.xml",
    )
    imgs = distinguishable([p.read_bytes() for p in split_images(tiny_data)], reference)

    def infer(client, img: bytes) -> tuple[int, dict | None]:
        body = {
            "inputs": [
                {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(img).decode()]}
            ]
        }
        r = requests.post(f"{client.inference_url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=60)
        return r.status_code, json.loads(r.json()["outputs"][0]["data"][0]) if r.ok else None

    with ts as client:  # no registration: the snapshot loads the model
        with ThreadPoolExecutor(len(imgs)) as ex:
            results = list(ex.map(lambda img: infer(client, img), imgs))
    assert [status for status, _ in results] == [200] * len(imgs)
    for (_, answer), img in zip(results, imgs):
        assert len(answer["top_k"]) == 3
        assert_answer_matches(answer, reference.expected(img))
