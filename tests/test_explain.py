"""Explanations: the class activation maps' methods in the exported file, Grad-CAM, the map's
coordinates, the handler's /explanations answers (in-process and through a real TorchServe),
and whether the maps point at the dog in real photos."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from ts.context import RequestProcessor

from bench import explain as pointing
from bench import report
from handlers.decode import MAX_PIXELS, decode_image, open_image
from handlers.dog_breeds import NOTHING_TO_EXPLAIN, DogBreedClassifier
from handlers.explain import (
    BadTarget,
    colours,
    crop_box,
    explanation,
    grad_cam,
    has_cam,
    parse_target,
    peak,
)
from handlers.image_classifier import ImageClassifier
from handlers.optimize import compare
from handlers.preset import EvalPreset
from models import cam
from models.imagenet import WithImageNetGate
from models.registry import get_model
from serving.archive import build_archive
from serving.server import LocalServer
from tests.conftest import answers, make_context, photo_file, shared_photo
from training.export import methods
from training.export import torchscript as export_mod

CPU = torch.device("cpu")


def crops(n: int = 2, crop: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, crop, crop, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "efficientnet_lite0", "scratch_cnn"])
def test_every_registered_network_has_the_split(name):
    """The features and the head found for each architecture compute the model's logits."""
    model = get_model(name, 5, weights=None).eval()
    parts = cam.split(model)
    assert parts is not None, name
    features, head = parts
    x = crops()
    with torch.inference_mode():
        a = features(x)
        assert a.dim() == 4 and a.shape[-1] > 1, a.shape  # spatial maps, not pooled vectors
        assert compare(head(a), model(x)).ok


def test_the_wrappers_explain_the_wrapped_models_answer():
    """The dog app's model (a breed model with an ImageNet network beside it): the map is the
    breed model's, its head the breed logits (the first output)."""
    breeds, gate = get_model("mobilenet_v2", 4, weights=None), get_model("scratch_cnn", 1000, weights=None)
    preset = EvalPreset()
    wrapped = WithImageNetGate(breeds, gate, preset, preset).eval()
    features, head = cam.split(wrapped)
    x = crops()
    with torch.inference_mode():
        assert compare(head(features(x)), wrapped(x)[0]).ok


def test_a_network_without_spatial_features_has_no_split():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    assert cam.split(model, crop=32) is None


def test_the_export_leaves_forward_exactly_as_it_was():
    """The file with the maps' methods answers bit for bit as one without them, and its
    two methods together compute the same logits."""
    model = get_model("mobilenet_v2", 4, weights=None).eval()
    with_cam, without = (methods.to_torchscript(model, 224, explain=e) for e in (True, False))
    assert has_cam(with_cam) and not has_cam(without)
    x = crops(3, seed=5)
    with torch.inference_mode():
        assert torch.equal(with_cam(x), without(x))
        assert compare(with_cam.cam_head(with_cam.cam_features(x)), with_cam(x)).ok


class RedDetector(nn.Module):
    """Class 0: how red the image is (a 1x1 convolution on the red channel), class 1: the opposite."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 1, 1, bias=False), nn.ReLU())
        self.classifier = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
            self.classifier.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def test_grad_cam_lies_where_the_evidence_is():
    """A red square in one corner: the map of "red" peaks there; the map of "not red" has
    no positive evidence anywhere (all zeros), not a peak copied from the other class."""
    scripted = methods.to_torchscript(RedDetector(), 32)
    x = torch.zeros(3, 32, 32)
    x[0, 20:28, 4:12] = 1.0  # rows 20-27, columns 4-11
    red, logits = grad_cam(scripted, x, 0)
    assert red.shape == (32, 32) and float(red.max()) == 1.0
    r, c = divmod(int(red.argmax()), 32)
    assert 20 <= r < 28 and 4 <= c < 12
    assert float(red[:20].max()) == 0.0
    not_red, _ = grad_cam(scripted, x, 1)
    assert float(not_red.max()) == 0.0
    # In the answer: the red map's peak in the square's pixels, none for a map of zeros.
    size, geometry = (32, 32), (32, 32)
    px, py = explanation(scripted, x, 0, "red", 0.9, size, geometry)["peak"]
    assert 4 <= px <= 12 and 20 <= py <= 28
    assert explanation(scripted, x, 1, "not red", 0.1, size, geometry)["peak"] is None
    with torch.inference_mode():
        assert torch.allclose(logits, scripted(x[None])[0])


def test_the_peak_is_in_the_hottest_cell_in_image_pixels():
    grid = torch.zeros(7, 7)
    grid[1, 5] = 1.0
    grid[1, 4] = 0.5  # pulls the estimate left, within the hottest cell's neighbourhood
    x, y = peak(grid, (100.0, 50.0, 800.0, 750.0))  # cells of 100 x 100 pixels
    assert x == pytest.approx((650 + 0.5 * 550) / 1.5, abs=0.1) and y == 200.0  # cell centres 650, 550


def test_the_box_is_the_square_the_model_sees():
    """The square of ``crop_box``, resized to the model's input, is the eval transform of a
    real photo: closer to it than the same square moved by 3 pixels, or grown by 5, in any
    direction (one resampling against the transform's two never matches exactly)."""
    image = open_image(photo_file("dog_labrador"))
    preset = EvalPreset()
    reference = preset.transform()(image)

    def distance(box) -> float:
        resized = image.resize((224, 224), Image.Resampling.BILINEAR, box=box)
        return float((preset.to_normalized(resized) - reference).abs().mean())

    left, top, right, bottom = box = crop_box(image.size, preset.resize_size, preset.crop_size)
    assert right - left == pytest.approx(bottom - top) == pytest.approx(224 / 256 * min(image.size))
    others = [(left + dx, top + dy, right + dx, bottom + dy) for dx, dy in ((3, 0), (-3, 0), (0, 3), (0, -3))]
    others.append((left - 5, top - 5, right + 5, bottom + 5))
    # Measured: 0.051 for the box, 0.095 for the nearest other.
    assert distance(box) < 0.75 * min(distance(b) for b in others)


def test_colours_run_from_blue_to_red():
    c = colours(torch.tensor([0.0, 0.5, 1.0]))
    assert c[0].tolist() == [0, 0, 1] and c[1].tolist() == [0, 1, 0] and c[2].tolist() == [1, 0, 0]


def test_targets_by_label_or_index():
    mapping = {"0": "beagle", "1": "Labrador retriever"}
    assert parse_target(None, mapping) is None and parse_target(b"", mapping) is None
    assert parse_target(b"labrador retriever", mapping) == 1 and parse_target("0", mapping) == 0
    for bad in ("2", "-1", "poodle"):
        with pytest.raises(BadTarget, match="target"):
            parse_target(bad, mapping)


def explain_context(export_dir: Path, kinds: list):
    """A worker's context for a batch whose request i came to /explanations when kinds[i]
    is "explain" (or a dict of its other headers), to /predictions otherwise."""
    ctx = make_context(export_dir, len(kinds))
    ctx.request_processor = [
        RequestProcessor({"explain": "True", **(k if isinstance(k, dict) else {})} if k != "predict" else {})
        for k in kinds
    ]
    return ctx


def overlay_image(explanation: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(explanation["overlay"])))


def test_one_batch_of_predictions_explanations_and_a_bad_target(imagenet_dogs_export):
    """Each request of one batch gets its own kind of answer: the prediction is the same as
    alone, the explanation adds the map of the breed (with the overlay asked for), a bad
    target and a non-dog get their answers, and nothing fails for the others."""
    h = DogBreedClassifier()
    h.initialize(make_context(imagenet_dogs_export, 1))
    dog = photo_file("dog_labrador").read_bytes()
    kitten = photo_file("kitten").read_bytes()
    rows = [
        {"body": bytearray(dog)},
        {"body": bytearray(dog), "overlay": b"true"},
        {"body": bytearray(dog), "target": b"no such breed"},
        {"body": bytearray(kitten)},
        {"body": bytearray(dog)},
    ]
    # The parameters as form fields (rows 1, 2) or as headers (row 4), as TorchServe passes them.
    kinds = ["predict", "explain", "explain", "explain", {"X-Explain-Target": "beagle"}]
    ctx = explain_context(imagenet_dogs_export, kinds)
    got = answers(h.handle(rows, ctx))
    alone = answers(h.handle([{"body": bytearray(dog)}], make_context(imagenet_dogs_export, 1)))[0]
    assert got[0] == alone and "explanation" not in got[0]
    e = got[1]["explanation"]
    assert got[1]["breed"] == alone["breed"] == e["label"] == "Labrador retriever"
    assert e["method"] == "grad-cam" and e["index"] == alone["top_k"][0]["index"]
    assert len(e["grid"]) == 7 and all(len(r) == 7 for r in e["grid"])
    assert max(max(r) for r in e["grid"]) == 1.0 and min(min(r) for r in e["grid"]) >= 0
    left, top, right, bottom = e["box"]
    w, h_ = decode_image(dog, MAX_PIXELS).size
    assert 0 <= left < right <= w and 0 <= top < bottom <= h_
    assert left <= e["peak"][0] <= right and top <= e["peak"][1] <= bottom
    picture = overlay_image(e)
    assert picture.format == "PNG" and max(picture.size) <= 512
    assert abs(picture.size[0] / picture.size[1] - w / h_) < 0.01
    assert ctx.get_response_status(2)[0] == 400 and got[2]["type"] == "BadTarget"
    assert "no such breed" in got[2]["message"]
    assert (
        got[3]["subject"] == "none" and got[3]["explanation"] is None and got[3]["why"] == NOTHING_TO_EXPLAIN
    )
    assert got[4]["explanation"]["label"] == "beagle" and got[4]["breed"] == "Labrador retriever"
    assert "overlay" not in got[4]["explanation"]
    for i in (0, 1, 3, 4):
        assert ctx.get_response_status(i)[0] in (None, 200), i


def test_the_plain_classifier_explains_its_top_class(exported):
    """The plain handler on the trained tiny model: an explanation of its answer's top class,
    the same answer otherwise."""
    h = ImageClassifier()
    h.initialize(make_context(exported, 1))
    assert h.cam_module is not None
    image = photo_file("coffee").read_bytes()
    got = answers(h.handle([{"body": bytearray(image)}], explain_context(exported, ["explain"])))[0]
    plain = answers(h.handle([{"body": bytearray(image)}], make_context(exported, 1)))[0]
    assert got["top_k"] == plain["top_k"]
    assert got["explanation"]["label"] == plain["top_k"][0]["label"]


@pytest.mark.slow
def test_the_maps_point_at_the_dog(imagenet_dogs_export):
    """Real dog photos pasted on plain, noisy and photo backgrounds (one placement each, in
    turn) and beside real photos of people: the map of the dog's breed peaks on the dog for
    nearly all, and so does the map of the answer's breed. Measured here: 95% and 92% over
    all (docs/explanations.md has the full run); the limits leave room for other kernels'
    roundings, not for a map that points elsewhere (a map off by its coarse cells, or of
    the wrong image region, falls to a third or so)."""
    shared_photo("dogs")
    config = yaml.safe_load((imagenet_dogs_export / export_mod.CONFIG_FILE).read_text())
    preset = EvalPreset.from_dict(config["handler"])
    labels = json.loads((imagenet_dogs_export / export_mod.LABELS_FILE).read_text())
    module = torch.jit.load(str(imagenet_dogs_export / export_mod.MODEL_FILE))
    cases = pointing.canvases(preset, 1) + pointing.beside_people(preset)
    rates = pointing.rates(pointing.pointing(module, preset, labels, cases))
    assert rates["all"]["cases"] == 56 * 3 + 56 * 2
    assert rates["all"]["breed_hit"] >= 0.9 * rates["all"]["cases"], rates
    assert rates["all"]["hit"] >= 0.85 * rates["all"]["cases"], rates
    for kind, r in rates.items():
        assert r["breed_hit"] >= 0.85 * r["cases"], (kind, rates)


@pytest.mark.torchserve
def test_explanations_through_torchserve(imagenet_dogs_export, exported, tmp_path):
    """/explanations on a real TorchServe: the dog app's map of a dog pasted at a known place
    peaks on it, with the overlay asked for in the query string; bad input gets the same
    400 as /predictions; the plain classifier explains too."""
    store = tmp_path / "store"
    build_archive(imagenet_dogs_export, "imagenet_dogs", store)
    build_archive(exported, "tiny_shapes", store)
    preset = EvalPreset()
    canvas = pointing.background("plain", 0, [])
    dog = pointing.fitted(open_image(photo_file("dog_labrador")), pointing.DOG_SIDE)
    square = pointing.seen_square(preset)
    box = pointing.pasted(canvas, dog, pointing.place_at("bottom right", dog.size, square))
    with LocalServer(store, tmp_path / "ts") as client:  # load_models=all
        got = client.explain("imagenet_dogs", pointing.jpeg(canvas), overlay=True)
        assert got["subject"] == "dog", got
        e = got["explanation"]
        assert e["label"] == got["breed"] and pointing.inside(e["peak"], box), (e["peak"], box)
        assert overlay_image(e).size == (512, 512)
        named = client.explain("imagenet_dogs", pointing.jpeg(canvas), target=e["index"])
        assert named["explanation"]["grid"] == e["grid"] and "overlay" not in named["explanation"]
        plain = client.predict("imagenet_dogs", pointing.jpeg(canvas))
        assert "explanation" not in plain and plain["breed"] == got["breed"]
        for bad, kind in ((b"not an image", "BadImage"), (pointing.jpeg(canvas), "BadTarget")):
            r = client.explain_response(
                "imagenet_dogs", bad, target="unicorn" if kind == "BadTarget" else None
            )
            assert r.status_code == 400 and r.json()["type"] == kind, r.text
        kitten = client.explain("imagenet_dogs", photo_file("kitten").read_bytes())
        assert kitten["subject"] == "none" and kitten["explanation"] is None and kitten["why"]
        shapes = client.explain("tiny_shapes", photo_file("coffee").read_bytes())
        assert shapes["explanation"]["label"] == shapes["top_k"][0]["label"]


@pytest.mark.slow
def test_the_benchmark_writes_what_it_measured(tmp_path):
    """`make bench-explain` on four dogs: its page's tables carry the figures of its JSON."""
    shared_photo("dogs")
    result = pointing.main(["--dogs", "4", "--placements", "1", "--rounds", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "explain.json").read_text())
    page = (tmp_path / "explain.md").read_text()
    assert saved["rates"] == result["rates"] and saved["rates"]["all"]["cases"] == 4 * 3 + 4 * 2
    for key, r in saved["rates"].items():
        assert f"| {key} | {r['cases']} | {report.percent(r['hit'] / r['cases'])} |" in page
    c = saved["cost"]
    assert f"| {c['grad_cam']} |" in page and c["grad_cam"] > 0 and c["forward"] > 0
