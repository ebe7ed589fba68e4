"""Shared fixtures: a tiny generated dataset, a model trained on it, its export and archive,
and a real TorchServe on loopback serving it.

Everything is made here from nothing: no dataset or weights are downloaded.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageOps

from models.presets import EvalPreset
from serving.archive import build_archive
from serving.server import LocalServer
from training import export as export_mod
from training import pretrained
from training import train as train_mod
from training.demo_data import generate

CLASSES = ("circle", "square", "triangle")
MODEL_NAME = "tiny_shapes"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """3 classes x 14 images: 10 train, 2 valid, 2 test per class."""
    root = tmp_path_factory.mktemp("data")
    generate(root, per_class=14, classes=CLASSES, seed=1, quiet=True)
    return root


@pytest.fixture(scope="session")
def trained(tiny_data, tmp_path_factory) -> Path:
    """best.pt of the scratch_cnn baseline trained briefly on the tiny data.

    The served answers must depend on the image, or tests comparing them with
    in-process answers would prove little. Briefly trained BatchNorm models are not
    good for that: measured, a mobilenet_v2 trained 2-3 epochs here from random
    weights answers every image identically in eval mode (its running statistics
    have barely moved), while scratch_cnn has no BatchNorm.
    """
    out = tmp_path_factory.mktemp("run")
    train_mod.run(train_mod.parse_args([
        "--model", "scratch_cnn", "--data", str(tiny_data), "--out", str(out),
        "--epochs", "1", "--batch-size", "8", "--lr", "0.005", "--workers", "0"]))
    return out / "best.pt"


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory) -> Path:
    """The export folder, with a generous batch delay so concurrent requests share a batch."""
    out = tmp_path_factory.mktemp("export") / MODEL_NAME
    a = export_mod.parse_args(["--checkpoint", str(trained), "--out", str(out),
                               "--batch-size", "8", "--max-batch-delay", "300", "--top-k", "3"])
    export_mod.export(trained, out, a)
    return out


@pytest.fixture(scope="session")
def dog_export(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dog_export") / "tiny_dogs"
    a = export_mod.parse_args(["--checkpoint", str(trained), "--out", str(out), "--top-k", "3",
                               "--handler", "dog_breeds"])
    export_mod.export(trained, out, a)
    return out


@pytest.fixture(scope="session")
def imagenet_dogs_export(tmp_path_factory) -> Path:
    """The dog-breed model that needs no training (training/pretrained.py), exported as
    `make export` does."""
    run = tmp_path_factory.mktemp("imagenet_dogs_run")
    checkpoint = pretrained.write("imagenet_dogs", run)
    out = tmp_path_factory.mktemp("imagenet_dogs_export") / "imagenet_dogs"
    a = export_mod.parse_args(["--checkpoint", str(checkpoint), "--out", str(out),
                               "--handler", "dog_breeds"])
    export_mod.export(checkpoint, out, a)
    return out


@pytest.fixture(scope="session")
def model_store(exported, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    build_archive(exported, MODEL_NAME, store)
    return store


@pytest.fixture(scope="session")
def local_server(model_store, tmp_path_factory):
    """A real TorchServe on free loopback ports with the archive registered through the
    management API (with the token); stopped at the end even when tests fail.
    load_models is emptied so that registration is the test's doing, not the config's."""
    ts = LocalServer(model_store, tmp_path_factory.mktemp("torchserve"), {"load_models": ""})
    with ts as client:
        client.register(f"{MODEL_NAME}.mar")
        yield ts


@pytest.fixture(scope="session")
def server(local_server):
    """The REST client of the session's server."""
    return local_server.client


def split_images(root: Path, split: str = "test") -> list[Path]:
    return sorted(root.glob(f"{split}/*/*.jpg"))


def plain_decode(image: bytes) -> Image.Image:
    """Pillow's own decode of a plain 8-bit RGB or grey JPEG/PNG, turned upright: for these
    ``convert("RGB")`` is the picture, and a fault of the project's decoder cannot hide in
    the answers compared with it. Other images (high bit depth, transparency, a colour
    profile) need the project's decoder, so the reference refuses them."""
    img = Image.open(io.BytesIO(image))
    assert img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L"), (img.format, img.mode)
    assert not img.has_transparency_data and "icc_profile" not in img.info, img.info.keys()
    return ImageOps.exif_transpose(img).convert("RGB")


class Reference:
    """The answer evaluation computes in-process from the exported TorchScript file, with
    Pillow's plain decode (``plain_decode``) and the archive's eval transform."""

    def __init__(self, export_dir: Path):
        self.model = torch.jit.load(str(export_dir / "model.pt")).eval()
        cfg = yaml.safe_load((export_dir / "model-config.yaml").read_text())["handler"]
        self.transform = EvalPreset.from_dict(cfg).transform()
        self.labels = json.loads((export_dir / "index_to_name.json").read_text())

    def probabilities(self, image: bytes) -> dict[str, float]:
        x = self.transform(plain_decode(image)).unsqueeze(0)
        with torch.inference_mode():
            p = self.model(x).softmax(1)[0]
        return {self.labels[str(i)]: v for i, v in enumerate(p.tolist())}


@pytest.fixture(scope="session")
def reference(exported) -> Reference:
    return Reference(exported)


# A served answer's probabilities are within this of the reference's: the handler's one-pass
# crop is within one grey level of evaluation's transform (tests/test_presets.py).
ANSWER_TOLERANCE = 1e-4


def assert_answer_matches(answer: dict, expected: dict[str, float]) -> None:
    assert answer["top_k"][0]["label"] == max(expected, key=expected.get)
    for e in answer["top_k"]:
        assert e["probability"] == pytest.approx(expected[e["label"]], abs=ANSWER_TOLERANCE)


def distinguishable(images: list[bytes], reference: Reference, at_least: int = 4) -> list[bytes]:
    """Images whose reference answers differ pairwise by more than twice ANSWER_TOLERANCE
    in some class, so an answer handed to the wrong request cannot match its reference."""
    kept, answers = [], []
    for img in images:
        p = reference.probabilities(img)
        if all(max(abs(p[k] - q[k]) for k in p) > 2 * ANSWER_TOLERANCE for q in answers):
            kept.append(img)
            answers.append(p)
    assert len(kept) >= at_least, f"only {len(kept)} of {len(images)} images answer differently"
    return kept


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()
