"""What the shipped configuration and archives promise: loopback, tokens, registration only from
the model store, archives without pickled Python objects, checksums enforced."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from serving.archive import SUMS_FILE, read_sums, sha256
from serving.client import TorchServeError
from serving.server import read_properties
from tests.conftest import MODEL_NAME

ROOT = Path(__file__).resolve().parent.parent


def test_config_listens_on_loopback_only_with_tokens_on():
    cfg = read_properties(ROOT / "config.properties")
    addresses = {k: v for k, v in cfg.items() if k.endswith("_address")}
    assert {
        "inference_address",
        "management_address",
        "metrics_address",
        "grpc_inference_address",
        "grpc_management_address",
    } <= set(addresses)
    for key, value in addresses.items():
        host = urlparse(value).hostname if "://" in value else value
        assert host == "127.0.0.1", (key, value)
    assert cfg.get("disable_token_authorization", "false") == "false"
    assert cfg["enable_model_api"] == "true" and cfg["allowed_urls"] == "^$"
    assert int(cfg["max_request_size"]) == 20 * 2**20


def test_registration_of_a_path_outside_the_store_is_refused(server):
    with pytest.raises(TorchServeError) as e:
        server.register("/etc/ssl/evil.mar")
    assert e.value.status == 404 and "not found" in e.value.body["message"].lower()


# The runtime package ships whole; nothing of models/ or training/ does.
ALLOWED_IN_ARCHIVE = {
    "image_classifier.py",
    "model.pt",
    "model-config.yaml",
    "index_to_name.json",
    "MAR-INF/MANIFEST.json",
} | {f"handlers/{p.name}" for p in (ROOT / "handlers").glob("*.py")}


def test_archive_holds_torchscript_labels_config_and_handler_code_only(model_store, tmp_path):
    mar = model_store / f"{MODEL_NAME}.mar"
    with zipfile.ZipFile(mar) as z:
        assert set(z.namelist()) == ALLOWED_IN_ARCHIVE
        z.extract("model.pt", tmp_path)
    # model.pt is TorchScript: it loads without any Python class definitions.
    assert isinstance(torch.jit.load(str(tmp_path / "model.pt")), torch.jit.ScriptModule)


def test_archive_sums_are_recorded_in_sha256sum_format(model_store):
    mar = model_store / f"{MODEL_NAME}.mar"
    assert read_sums(model_store) == {mar.name: sha256(mar)}
    line = (model_store / SUMS_FILE).read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}  " + re.escape(mar.name), line)


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.fixture
def tampered_store(model_store, tmp_path) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(model_store / SUMS_FILE, store)
    shutil.copy(model_store / f"{MODEL_NAME}.mar", store)
    with open(store / f"{MODEL_NAME}.mar", "ab") as f:
        f.write(b"extra bytes")
    return store


def test_verify_refuses_a_tampered_archive(model_store, tampered_store):
    assert run("serving.archive", "--verify", "--model-store", str(model_store)).returncode == 0
    r = run("serving.archive", "--verify", "--model-store", str(tampered_store))
    assert r.returncode == 1 and "does not match its SHA-256" in r.stderr


def test_register_refuses_a_tampered_or_unknown_archive(server, tampered_store, tmp_path):
    # The client refuses before asking the server; the server would otherwise load it.
    shutil.move(tampered_store / f"{MODEL_NAME}.mar", tampered_store / "other_model.mar")
    key_file = str(server.key_file)
    args = (
        "serving.client",
        "--inference-url",
        server.inference_url,
        "--management-url",
        server.management_url,
        "--key-file",
        key_file,
        "register",
        "--model-store",
        str(tampered_store),
    )
    r = run(*args)
    assert r.returncode == 1 and "other_model.mar has no entry" in r.stderr
    line = f"{sha256(tampered_store / 'other_model.mar')[::-1]}  other_model.mar\n"
    (tampered_store / SUMS_FILE).write_text(line)
    r = run(*args)
    assert r.returncode == 1 and "does not match its SHA-256" in r.stderr
    assert "other_model" not in {m["modelName"] for m in server.models()}
