"""The dog-breed handler: a dog, a human face, or neither."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import skimage
import torch
import yaml
from PIL import Image

from handlers.dog_breeds import NONE_MESSAGE, DogBreedClassifier, count_faces, face_detector
from serving.archive import build_archive
from serving.server import LocalServer
from tests.conftest import png_bytes, split_images
from tests.test_handler import answers, make_context

FACE_PHOTO = Path(skimage.__file__).parent / "data" / "astronaut.png"  # NASA, public domain


@pytest.fixture(scope="module")
def face() -> Image.Image:
    return Image.open(FACE_PHOTO).convert("RGB")


def test_face_detector_finds_the_face_in_a_real_photo(face):
    cascade = face_detector()
    assert count_faces(cascade, face) == 1
    # A phone-sized copy is shrunk before detection and still has its face.
    assert count_faces(cascade, face.resize((4000, 4000))) == 1


def test_face_detector_finds_none_in_generated_images(tiny_data):
    cascade = face_detector()
    for path in split_images(tiny_data) + split_images(tiny_data, "valid"):
        assert count_faces(cascade, Image.open(path).convert("RGB")) == 0, path


def handler_for(export_dir: Path, **handler_cfg) -> DogBreedClassifier:
    ctx = make_context(export_dir, 1)
    ctx.model_yaml_config["handler"].update(handler_cfg)
    h = DogBreedClassifier()
    h.initialize(ctx)
    return h


def classify(h: DogBreedClassifier, export_dir: Path, images: list[bytes]) -> list[dict]:
    return answers(h.handle([{"body": bytearray(b)} for b in images], make_context(export_dir, len(images))))


def test_export_names_the_handler_and_its_settings(dog_export):
    cfg = yaml.safe_load((dog_export / "model-config.yaml").read_text())["handler"]
    assert cfg["name"] == "dog_breeds" and cfg["dog_threshold"] == 0.5 and cfg["face_max_side"] == 512


def test_fallback_rule_face_then_confidence(dog_export, face, tiny_data):
    shape = split_images(tiny_data)[0].read_bytes()
    photo = png_bytes(face)
    always_dog = handler_for(dog_export, dog_threshold=0.0)
    human, dog = classify(always_dog, dog_export, [photo, shape])
    # Without an ImageNet head a face is looked for first, even when any image counts as a dog.
    assert human["subject"] == "human" and human["resembles"] == human["top_k"][0]["label"]
    assert dog["subject"] == "dog" and dog["breed"] == dog["top_k"][0]["label"]
    never_dog = handler_for(dog_export, dog_threshold=1.01)
    human, nothing = classify(never_dog, dog_export, [photo, shape])
    assert human["subject"] == "human"
    assert nothing == {"subject": "none", "message": NONE_MESSAGE}


class WithImageNetHead(torch.nn.Module):
    """The exported breed model plus a stand-in ImageNet head whose top class is a dog
    class (207) for bright images and a non-dog class (5) for dark ones."""

    def __init__(self, breeds: torch.nn.Module):
        super().__init__()
        self.breeds = breeds

    def forward(self, x: torch.Tensor):
        imagenet = torch.zeros(x.shape[0], 1000)
        brightness = x.mean(dim=(1, 2, 3))
        imagenet[:, 207] = brightness
        imagenet[:, 5] = -brightness
        return self.breeds(x), imagenet


def test_imagenet_head_decides_dogs(dog_export, face, tmp_path):
    export = tmp_path / "with_head"
    shutil.copytree(dog_export, export)
    scripted = torch.jit.script(WithImageNetHead(torch.jit.load(str(dog_export / "model.pt"))))
    scripted.save(str(export / "model.pt"))
    h = handler_for(export, dog_threshold=1.01)  # the confidence rule would say "none" to all
    bright = png_bytes(Image.new("RGB", (64, 64), (250, 250, 250)))
    dark = png_bytes(Image.new("RGB", (64, 64), (5, 5, 5)))
    dark_face = png_bytes(face.point(lambda v: v // 4))  # darkened: the head says "not a dog"
    dog, nothing, human = classify(h, export, [bright, dark, dark_face])
    assert dog["subject"] == "dog"
    assert nothing == {"subject": "none", "message": NONE_MESSAGE}
    assert human["subject"] == "human"


def test_served_through_torchserve(dog_export, face, tiny_data, tmp_path):
    store = tmp_path / "store"
    build_archive(dog_export, "tiny_dogs", store)
    with LocalServer(store, tmp_path / "ts") as client:  # load_models=all
        answer = client.predict("tiny_dogs", png_bytes(face))
        assert answer["subject"] == "human" and answer["resembles"] == answer["top_k"][0]["label"]
        bad = client.predict_response("tiny_dogs", b"not an image")
        assert bad.status_code == 400 and bad.json()["type"] == "BadImage"
