"""The handler without a server: TorchServe's own Context around a real exported model."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.image_classifier import ImageClassifier
from tests.conftest import MODEL_NAME, split_images

ROOT = Path(__file__).resolve().parent.parent


def make_context(export_dir, n_requests: int) -> Context:
    """TorchServe's own Context and metrics cache, as a worker builds them.

    With the handler's ``threads`` setting at None (torch's own choice): the thread count
    is process-wide, and the test process keeps its own (tests/test_speed_options.py
    tests the setting).
    """
    metrics = MetricsCacheYamlImpl(config_file_path=str(ROOT / "serving" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.set_request_ids({i: str(uuid.uuid4()) for i in range(n_requests)})
    config = yaml.safe_load((export_dir / "model-config.yaml").read_text())
    config["handler"]["threads"] = None
    ctx = Context(MODEL_NAME, str(export_dir), {"model": {"serializedFile": "model.pt"}},
                  batch_size=8, gpu=None, mms_version="0.12.0", metrics=metrics,
                  model_yaml_config=config)
    ctx.request_processor = [RequestProcessor({}) for _ in range(n_requests)]
    return ctx


def answers(out: list) -> list:
    """The handler's answers as dicts: rows that came as bytes are answered with JSON text."""
    return [json.loads(a) if isinstance(a, str) else a for a in out]


@pytest.fixture(scope="module")
def handler(exported):
    h = ImageClassifier()
    h.initialize(make_context(exported, 1))
    return h


def test_initialize_reads_preprocessing_and_top_k_from_model_config(handler):
    assert handler.top_k == 3
    assert (handler.preset.resize_size, handler.preset.crop_size) == (256, 224)
    assert set(handler.mapping.values()) == {"circle", "square", "triangle"}


def test_batch_of_three_with_one_corrupt(handler, exported, tiny_data, reference):
    good = split_images(tiny_data)[:2]
    data = [
        {"body": bytearray(good[0].read_bytes())},             # raw body
        {"data": bytearray(b"\xff\xd8\xff\xe0 not really a jpeg")},  # corrupt
        {"data": bytearray(good[1].read_bytes())},             # multipart field
    ]
    ctx = make_context(exported, 3)
    raw = handler.handle(data, ctx)
    # Rows that came as bytes are answered with JSON text (TorchServe sends it as is).
    assert all(isinstance(a, str) for a in raw)
    assert [ctx.get_response_content_type(i) for i in range(3)] == ["application/json"] * 3
    out = answers(raw)
    assert len(out) == 3
    assert [ctx.get_response_status(i)[0] for i in range(3)] == [200, 400, 200]
    assert out[1]["code"] == 400 and out[1]["type"] == "BadImage"
    assert "not a decodable image" in out[1]["message"]
    assert [ctx.get_response_headers(i)["X-Batch-Size"] for i in range(3)] == ["2", "2", "2"]
    for answer, path in zip((out[0], out[2]), good):
        expected = reference.probabilities(path.read_bytes())
        assert len(answer["top_k"]) == 3
        probs = [e["probability"] for e in answer["top_k"]]
        assert probs == sorted(probs, reverse=True)
        assert answer["top_k"][0]["label"] == max(expected, key=expected.get)
        for e in answer["top_k"]:
            assert e["probability"] == pytest.approx(expected[e["label"]], abs=1e-4)
            assert handler.mapping[str(e["index"])] == e["label"]


def test_batch_of_only_bad_requests(handler, exported):
    ctx = make_context(exported, 2)
    out = answers(handler.handle([{"body": bytearray(b"")}, {"body": {"json": True}}], ctx))
    assert [o["code"] for o in out] == [400, 400]
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [400, 400]
    assert ctx.get_response_headers(0)["X-Batch-Size"] == "0"
