"""The handler's own metrics, exported by a real TorchServe in prometheus mode."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL_NAME, split_images

pytestmark = pytest.mark.torchserve


def samples(metrics: dict[str, float], name: str, **labels) -> list[float]:
    """The values of the samples of ``name`` whose labels include ``labels``."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return [v for k, v in metrics.items() if k.startswith(name + "{") and all(w in k for w in want)]


def sample(metrics: dict[str, float], name: str, **labels) -> float:
    """The value of that one sample (0 if none yet: a counter not yet incremented)."""
    found = samples(metrics, name, **labels)
    assert len(found) <= 1, found
    return found[0] if found else 0.0


def present(metrics: dict[str, float], name: str, **labels) -> float:
    """The value of that one sample, which must exist."""
    found = samples(metrics, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_handler_metrics_are_exported_with_the_right_values(server, tiny_data):
    """Counters read before and after a known set of requests; the bad ones go first, so the
    DecodeTime gauge (the last batch's) holds a good image's decoding time."""
    before = server.metrics()
    for bad in (b"", b"", b'{"a": 1}', b"\x00\x01 not an image"):
        assert server.predict_response(MODEL_NAME, bad).status_code == 400
    goods = [p.read_bytes() for p in split_images(tiny_data)[:3]]
    for g in goods:
        server.predict(MODEL_NAME, g)
    after = server.metrics()

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("ImagesServed", ModelName=MODEL_NAME) == 3
    assert delta("ImagesRejected", ModelName=MODEL_NAME, Reason="empty") == 2
    # the JSON-looking bytes and the garbage
    assert delta("ImagesRejected", ModelName=MODEL_NAME, Reason="undecodable") == 2
    assert delta("ts_inference_requests_total", model_name=MODEL_NAME) == 7
    assert present(after, "BatchSize", ModelName=MODEL_NAME) == 1  # requests sent one at a time
    # A 256 px JPEG's decode and transform take about a millisecond; 0 would mean no timing.
    assert present(after, "DecodeTime", ModelName=MODEL_NAME) > 0
