"""The handler's own metrics, exported by a real TorchServe in prometheus mode."""
from __future__ import annotations

from tests.conftest import MODEL_NAME, split_images


def sample(metrics: dict[str, float], name: str, **labels) -> float:
    """The value of the sample of ``name`` whose labels include ``labels`` (0 if none yet)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    found = [v for k, v in metrics.items()
             if k.startswith(name + "{") and all(w in k for w in want)]
    assert len(found) <= 1, found
    return found[0] if found else 0.0


def test_handler_metrics_are_exported_with_the_right_values(server, tiny_data):
    before = server.metrics()
    goods = [p.read_bytes() for p in split_images(tiny_data)[:3]]
    for g in goods:
        server.predict(MODEL_NAME, g)
    for bad in (b"", b"", b'{"a": 1}'):
        assert server.predict_response(MODEL_NAME, bad).status_code == 400
    assert server.predict_response(MODEL_NAME, b"\x00\x01 not an image").status_code == 400
    after = server.metrics()

    def delta(name, **labels):
        return sample(after, name, ModelName=MODEL_NAME, **labels) - sample(before, name, ModelName=MODEL_NAME, **labels)

    assert delta("ImagesServed") == 3
    assert delta("ImagesRejected", Reason="empty") == 2
    assert delta("ImagesRejected", Reason="undecodable") == 2  # the JSON-looking bytes and the garbage
    assert sample(after, "BatchSize", ModelName=MODEL_NAME) == 1  # requests sent one at a time
    assert sample(after, "DecodeTime", ModelName=MODEL_NAME) >= 0
    assert sample(after, "ts_inference_requests_total", model_name=MODEL_NAME) >= 7
