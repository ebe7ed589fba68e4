"""Shared fixtures: a tiny generated dataset, a model trained on it, its export and archive,
and a real TorchServe on loopback serving it.

Everything is made here from nothing: no dataset or weights are downloaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.optimize import RTOL, tensors
from handlers.preset import EvalPreset
from serving.archive import build_archive
from serving.server import LocalServer
from training.demo.photos import SHARED_PHOTOS, packaged, photos
from training.demo.shapes import generate
from training.export import pretrained
from training.export import torchscript as export_mod
from training.fit import train as train_mod

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("circle", "square", "triangle")
MODEL_NAME = "tiny_shapes"


# Fixtures that start a real TorchServe: a test that uses one is marked torchserve.
SERVER_FIXTURES = {"local_server", "server", "envelope_server", "ts_client", "smoke"}
# Fixtures that take tens of seconds to build: a test that uses one is marked slow.
SLOW_FIXTURES = {"int8_export", "imagenet_dogs_export", "dog_export", "dog_app"}


def pytest_collection_modifyitems(items):
    for item in items:
        names = set(item.fixturenames)
        if names & SERVER_FIXTURES:
            item.add_marker(pytest.mark.torchserve)
        if names & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


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
    train_mod.run(
        train_mod.parse_args(
            [
                "--model",
                "scratch_cnn",
                "--data",
                str(tiny_data),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--lr",
                "0.005",
                "--workers",
                "0",
            ]
        )
    )
    return out / "best.pt"


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory) -> Path:
    """The export folder, with a generous batch delay so concurrent requests share a batch."""
    out = tmp_path_factory.mktemp("export") / MODEL_NAME
    a = export_mod.parse_args(
        [
            "--checkpoint",
            str(trained),
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--max-batch-delay",
            "300",
            "--top-k",
            "3",
            # The tests compare served answers with in-process fp32 ones at fp32 tolerances,
            # on every CPU; tests/test_bf16.py serves and checks the bf16 copy.
            "--precision",
            "fp32",
        ]
    )
    export_mod.export(trained, out, a)
    return out


@pytest.fixture(scope="session")
def dog_export(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dog_export") / "tiny_dogs"
    a = export_mod.parse_args(
        ["--checkpoint", str(trained), "--out", str(out), "--top-k", "3", "--handler", "dog_breeds"]
        + ["--precision", "fp32"]
    )
    export_mod.export(trained, out, a)
    return out


@pytest.fixture(scope="session")
def imagenet_dogs_export(tmp_path_factory) -> Path:
    """The dog-breed model that needs no training (training/export/pretrained.py), exported as
    `make export` does."""
    return pretrained.write_export("imagenet_dogs", tmp_path_factory.mktemp("imagenet_dogs_export"))


def with_precision(export_dir: Path, precision: str, parent: Path) -> Path:
    """A copy of an export (model.pt linked, not copied) whose model-config.yaml sets the
    handler's ``precision``; ``bf16`` runs the file's bf16 copy on every CPU."""
    out = parent / export_dir.name
    out.mkdir(parents=True)
    for f in export_dir.iterdir():
        if f.name != export_mod.CONFIG_FILE:
            os.link(f, out / f.name)
    config = yaml.safe_load((export_dir / export_mod.CONFIG_FILE).read_text())
    config["handler"]["precision"] = precision
    (out / export_mod.CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
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


def shared_photo(*parts: str) -> Path:
    """A file or folder of ``../shared/photos`` (the real photos beside the checkout).

    Fails, naming the folder and where it comes from, when it is absent: a test that needs
    real photos must not pass, skip or die with a KeyError without them.
    """
    path = SHARED_PHOTOS.joinpath(*parts)
    if not path.exists():
        pytest.fail(
            f"{path} is missing: the tests need the real photos of ../shared/photos beside "
            f"the checkout (a dog, a kitten, dogs/ and people/ with labels.csv; see its "
            f"README). Clone the project next to that shared/ folder.",
            pytrace=False,
        )
    return path


def photo_file(name: str) -> Path:
    """A photo by name: one installed with a package (training.demo.photos.packaged), else the file
    of ``../shared/photos`` with that stem, failing as ``shared_photo`` does when absent."""
    found = packaged().get(name) or photos().get(name)
    if found is None or not found.exists():
        shared_photo(f"{name}.jpg")  # fails, naming the folder
    return found


@pytest.fixture(scope="session")
def shared_photos() -> Path:
    """The ``../shared/photos`` folder; fails with the message above when it is absent."""
    return shared_photo()


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


@dataclass(frozen=True)
class Expected:
    """The reference's answer for one image, and how far a served answer may be from it."""

    probabilities: dict[str, float]
    # The served model's kernels (oneDNN Graph's fused copy for its batch size, another
    # instruction set) may move each logit by handlers.optimize.RTOL of the logits' scale,
    # and a softmax probability moves by at most half the largest change of the logits.
    # The handler's one-pass crop (within a grey level of evaluation's on at most 0.5% of
    # the values, tests/test_presets.py) moves them by far less.
    tolerance: float

    @property
    def top(self) -> str:
        return max(self.probabilities, key=self.probabilities.get)

    @property
    def decisive(self) -> bool:
        """Whether the top class leads the next by more than two tolerances: then no
        change within the tolerance can reorder them."""
        first, second = sorted(self.probabilities.values(), reverse=True)[:2]
        return first - second > 2 * self.tolerance


class Reference:
    """The answer evaluation computes in-process from the exported TorchScript file, with
    Pillow's plain decode (``plain_decode``) and the archive's eval transform."""

    def __init__(self, export_dir: Path):
        self.model = torch.jit.load(str(export_dir / "model.pt")).eval()
        cfg = yaml.safe_load((export_dir / "model-config.yaml").read_text())["handler"]
        self.transform = EvalPreset.from_dict(cfg).transform()
        self.labels = json.loads((export_dir / "index_to_name.json").read_text())

    def logits(self, image: bytes) -> torch.Tensor:
        x = self.transform(plain_decode(image)).unsqueeze(0)
        with torch.inference_mode():
            return tensors(self.model(x))[0][0]

    def expected(self, image: bytes) -> Expected:
        logits = self.logits(image)
        probabilities = {self.labels[str(i)]: v for i, v in enumerate(logits.softmax(0).tolist())}
        return Expected(probabilities, 0.5 * RTOL * logits.abs().max().item())

    def probabilities(self, image: bytes) -> dict[str, float]:
        return self.expected(image).probabilities


@pytest.fixture(scope="session")
def reference(exported) -> Reference:
    return Reference(exported)


def assert_answer_matches(answer: dict, expected: Expected) -> None:
    """A served answer is the reference's: its probabilities within the tolerance, and its
    top class the same wherever the reference decides it."""
    if expected.decisive:
        assert answer["top_k"][0]["label"] == expected.top
    for e in answer["top_k"]:
        assert e["probability"] == pytest.approx(
            expected.probabilities[e["label"]], abs=expected.tolerance
        ), expected


def assert_same_answer(got: dict, want: dict, tolerance: float) -> None:
    """Two served answers for the same picture: the same probabilities within ``tolerance``
    (``Expected.tolerance``: they may come from differently compiled copies of the model)."""
    want_p = {e["label"]: e["probability"] for e in want["top_k"]}
    for e in got["top_k"]:
        if e["label"] in want_p:
            assert e["probability"] == pytest.approx(want_p[e["label"]], abs=tolerance), (got, want)
    assert got["top_k"][0]["probability"] == pytest.approx(want["top_k"][0]["probability"], abs=tolerance), (
        got,
        want,
    )


def distinguishable(images: list[bytes], reference: Reference, at_least: int = 4) -> list[bytes]:
    """Images whose reference answers differ pairwise by more than both tolerances in some
    class, so an answer handed to the wrong request cannot match its reference."""
    kept, answers = [], []
    for img in images:
        e = reference.expected(img)
        if all(
            max(abs(e.probabilities[k] - q.probabilities[k]) for k in e.probabilities)
            > e.tolerance + q.tolerance
            for q in answers
        ):
            kept.append(img)
            answers.append(e)
    assert len(kept) >= at_least, f"only {len(kept)} of {len(images)} images answer differently"
    return kept


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# One grey level in normalised units, 1 / (255 x the smallest std); and float rounding.
ONE_GREY_LEVEL = 1 / (255 * min(EvalPreset().std))
FLOAT_ROUNDING = 1e-5


def photo_jpeg(w: int, h: int, orientation: int = 1, seed: int = 0) -> bytes:
    """Photo-like content (smooth gradients, detail, noise) that compresses like a photo."""
    rng = np.random.default_rng(seed)

    def field(gw, gh):
        return np.asarray(
            Image.fromarray(rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8)).resize(
                (w, h), Image.Resampling.BICUBIC
            ),
            dtype=np.float32,
        )

    arr = 0.7 * field(8, 6) + 0.3 * field(80, 60) + rng.normal(0, 10, (h, w, 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    exif = img.getexif()
    exif[0x0112] = orientation
    return png_bytes(img, "JPEG", quality=90, exif=exif.tobytes())


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
    ctx = Context(
        MODEL_NAME,
        str(export_dir),
        {"model": {"serializedFile": "model.pt"}},
        batch_size=8,
        gpu=None,
        mms_version="0.12.0",
        metrics=metrics,
        model_yaml_config=config,
    )
    ctx.request_processor = [RequestProcessor({}) for _ in range(n_requests)]
    return ctx


def answers(out: list) -> list:
    """The handler's answers as dicts: rows that came as bytes are answered with JSON text."""
    return [json.loads(a) if isinstance(a, str) else a for a in out]


@contextlib.contextmanager
def ctrl_c_in_epoch(n: int):
    """Within the block, training.fit.train's ``n``-th epoch is interrupted as by Ctrl-C as it starts."""
    real, calls = train_mod.train_one_epoch, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kw)

    train_mod.train_one_epoch = interrupted
    try:
        yield
    finally:
        train_mod.train_one_epoch = real


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
