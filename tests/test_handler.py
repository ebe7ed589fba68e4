"""The handler without a server: TorchServe's own Context around a real exported model."""

from __future__ import annotations

import pytest

from handlers.image_classifier import ImageClassifier
from tests.conftest import answers, assert_answer_matches, make_context, split_images


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
        {"body": bytearray(good[0].read_bytes())},  # raw body
        {"data": bytearray(b"\xff\xd8\xff\xe0 not really a jpeg")},  # corrupt
        {"data": bytearray(good[1].read_bytes())},  # multipart field
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
        assert len(answer["top_k"]) == 3
        probs = [e["probability"] for e in answer["top_k"]]
        assert probs == sorted(probs, reverse=True)
        assert_answer_matches(answer, reference.expected(path.read_bytes()))
        for e in answer["top_k"]:
            assert handler.mapping[str(e["index"])] == e["label"]


def test_batch_of_only_bad_requests(handler, exported):
    ctx = make_context(exported, 2)
    out = answers(handler.handle([{"body": bytearray(b"")}, {"body": {"json": True}}], ctx))
    assert [o["code"] for o in out] == [400, 400]
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [400, 400]
    assert ctx.get_response_headers(0)["X-Batch-Size"] == "0"
