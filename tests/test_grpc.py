"""The project's gRPC client against TorchServe's gRPC inference API, with the token."""

from __future__ import annotations

import grpc
import pytest

from serving.grpc_client import BadRequest, GrpcClient
from tests.conftest import MODEL_NAME, split_images

pytestmark = pytest.mark.torchserve


@pytest.fixture(scope="module")
def grpc_client(local_server):
    c = GrpcClient(
        f"127.0.0.1:{local_server.overrides['grpc_inference_port']}",
        key_file=local_server.workdir / "key_file.json",
    )
    yield c
    c.close()


def test_grpc_ping_and_predict_match_rest(grpc_client, server, tiny_data):
    assert "Healthy" in grpc_client.ping()
    for path in split_images(tiny_data)[:3]:
        body = path.read_bytes()
        assert grpc_client.predict(MODEL_NAME, body) == server.predict(MODEL_NAME, body)


def test_grpc_bad_image_is_an_error_with_the_handler_message(grpc_client):
    with pytest.raises(BadRequest) as e:
        grpc_client.predict(MODEL_NAME, b"not an image")
    assert e.value.answer["code"] == 400 and "not a decodable image" in e.value.answer["message"]


def test_grpc_without_a_token_is_refused(local_server, tiny_data):
    anonymous = GrpcClient(f"127.0.0.1:{local_server.overrides['grpc_inference_port']}", key_file=None)
    try:
        with pytest.raises(grpc.RpcError) as e:
            anonymous.predict(MODEL_NAME, split_images(tiny_data)[0].read_bytes())
        assert "Token Authorization failed" in e.value.details()
    finally:
        anonymous.close()
