"""The dog-breed handler: a dog, a human face, or neither, on real photos."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from handlers.dog_breeds import NONE_MESSAGE, DogBreedClassifier, count_faces, face_detector
from models import imagenet
from serving.archive import build_archive
from serving.server import LocalServer
from tests.conftest import answers, make_context, png_bytes, split_images
from training.photos import photos

pytestmark = pytest.mark.slow

PHOTOS = photos()  # the packaged ones, and ../shared/photos' dog and kitten


@pytest.fixture(scope="module")
def face() -> Image.Image:
    return Image.open(PHOTOS["astronaut"]).convert("RGB")


def test_face_detector_finds_the_face_in_a_real_photo(face):
    cascade = face_detector()
    assert count_faces(cascade, face) == 1
    # A phone-sized copy is shrunk before detection and still has its face.
    assert count_faces(cascade, face.resize((4000, 4000))) == 1


def test_face_detector_finds_none_in_generated_images(tiny_data):
    cascade = face_detector()
    for path in split_images(tiny_data) + split_images(tiny_data, "valid"):
        assert count_faces(cascade, Image.open(path).convert("RGB")) == 0, path


def handler_for(export_dir: Path) -> DogBreedClassifier:
    h = DogBreedClassifier()
    h.initialize(make_context(export_dir, 1))
    return h


def classify(h: DogBreedClassifier, export_dir: Path, images: list[bytes]) -> list[dict]:
    return answers(h.handle([{"body": bytearray(b)} for b in images], make_context(export_dir, len(images))))


def test_export_gives_a_breed_model_the_imagenet_gate(dog_export):
    """The tiny shape model has no ImageNet classes: the export puts EfficientNet-Lite0's
    beside it, and the second output is that network's answer for the same crop."""
    cfg = yaml.safe_load((dog_export / "model-config.yaml").read_text())["handler"]
    assert cfg["name"] == "dog_breeds" and cfg["dog_classes"] == [151, 268]
    assert "dog_threshold" not in cfg
    model = torch.jit.load(str(dog_export / "model.pt"))
    h = handler_for(dog_export)
    batch, errors, _, _ = h.preprocess([{"body": bytearray(PHOTOS["dog_labrador"].read_bytes())}])
    with torch.inference_mode():
        breeds, imagenet_logits = model(batch)
    assert breeds.shape == (1, 3) and imagenet_logits.shape == (1, 1000)
    assert imagenet.categories()[int(imagenet_logits.argmax())] == "Labrador retriever"


def test_a_model_without_imagenet_classes_is_refused(exported, tmp_path):
    export = tmp_path / "plain"
    shutil.copytree(exported, export)
    cfg = yaml.safe_load((export / "model-config.yaml").read_text())
    cfg["handler"].update(name="dog_breeds", dog_classes=[151, 268])
    (export / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(RuntimeError, match="no ImageNet output to tell dogs by"):
        handler_for(export)


class StandInGate(torch.nn.Module):
    """The exported breed model with its ImageNet output replaced: a dog class (207) wins
    for bright images, a non-dog class (5) for dark ones."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        imagenet_logits = torch.zeros(x.shape[0], 1000)
        brightness = x.mean(dim=(1, 2, 3))
        imagenet_logits[:, 207] = brightness
        imagenet_logits[:, 5] = -brightness
        return self.model(x)[0], imagenet_logits


def test_a_dog_first_and_a_face_only_when_not_a_dog(dog_export, face, tmp_path):
    export = tmp_path / "stand_in"
    shutil.copytree(dog_export, export)
    scripted = torch.jit.script(StandInGate(torch.jit.load(str(dog_export / "model.pt"))))
    scripted.save(str(export / "model.pt"))
    h = handler_for(export)
    bright = png_bytes(Image.new("RGB", (64, 64), (250, 250, 250)))
    dark = png_bytes(Image.new("RGB", (64, 64), (5, 5, 5)))
    bright_face = png_bytes(face.point(lambda v: 128 + v // 2))  # the gate says "a dog"
    dark_face = png_bytes(face.point(lambda v: v // 4))  # the gate says "not a dog"
    dog, nothing, dog_with_face, human = classify(h, export, [bright, dark, bright_face, dark_face])
    assert dog["subject"] == "dog" and dog["breed"] == dog["top_k"][0]["label"]
    assert nothing == {"subject": "none", "message": NONE_MESSAGE}
    assert dog_with_face["subject"] == "dog"
    assert human["subject"] == "human" and human["resembles"] == human["top_k"][0]["label"]


@pytest.mark.torchserve
def test_real_photos_through_torchserve(imagenet_dogs_export, dog_export, tmp_path):
    """Both dog-breed archives served by a real TorchServe: the pretrained breeds and the
    tiny shape model with EfficientNet-Lite0's ImageNet classes beside it."""
    store = tmp_path / "store"
    build_archive(imagenet_dogs_export, "imagenet_dogs", store)
    build_archive(dog_export, "tiny_dogs", store)
    breeds = set(json.loads((imagenet_dogs_export / "index_to_name.json").read_text()).values())
    assert breeds == set(imagenet.dog_breeds()) and "n02099712" not in breeds
    with LocalServer(store, tmp_path / "ts") as client:  # load_models=all
        def ask(model: str, name: str) -> dict:
            return client.predict(model, PHOTOS[name].read_bytes())

        dog = ask("imagenet_dogs", "dog_labrador")
        assert dog["subject"] == "dog" and dog["breed"] == "Labrador retriever", dog
        for name in ("astronaut", "grace_hopper"):
            person = ask("imagenet_dogs", name)
            assert person["subject"] == "human" and person["resembles"] in breeds, (name, person)
        for name in ("kitten", "chelsea", "coffee"):
            assert ask("imagenet_dogs", name)["subject"] == "none", name
        shapes = {"circle", "square", "triangle"}
        tiny = {name: ask("tiny_dogs", name) for name in ("dog_labrador", "astronaut", "coffee")}
        assert tiny["dog_labrador"]["subject"] == "dog" and tiny["dog_labrador"]["breed"] in shapes
        assert tiny["astronaut"]["subject"] == "human" and tiny["astronaut"]["resembles"] in shapes
        assert tiny["coffee"]["subject"] == "none"
        bad = client.predict_response("imagenet_dogs", b"not an image")
        assert bad.status_code == 400 and bad.json()["type"] == "BadImage"
