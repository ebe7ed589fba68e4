"""The dog-breed handler: a dog, a human face, or neither, on real photos."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from ts.utils.util import list_classes_from_module

from handlers import dog_breeds
from handlers.dog_breeds import (
    NONE_MESSAGE,
    DogBreedClassifier,
    count_faces,
    face_detector,
    imagenet_shares,
    verdict,
)
from handlers.settings import DogBreedSettings, HandlerSettings
from models import imagenet
from serving.archive import build_archive
from serving.server import LocalServer
from tests.conftest import (
    answers,
    make_context,
    photo_file,
    png_bytes,
    shared_photo,
    split_images,
    with_precision,
)


@pytest.fixture(scope="module")
def face() -> Image.Image:
    """Grace Hopper's portrait: the face check finds her face with a wide margin, darkened or
    brightened too (its score 1.2 or more against a threshold of -0.35; the astronaut's,
    a smaller part of her photo, scores -0.31 and -0.40 darkened)."""
    return Image.open(photo_file("grace_hopper")).convert("RGB")


def test_face_check_finds_the_face_in_a_real_photo(face):
    hog = face_detector()
    assert count_faces(hog, face) >= 1
    # A phone-sized copy is shrunk before detection and still has its face.
    assert count_faces(hog, face.resize((4000, 4000))) >= 1


def test_face_check_finds_none_in_generated_images(tiny_data):
    hog = face_detector()
    for path in split_images(tiny_data) + split_images(tiny_data, "valid"):
        assert count_faces(hog, Image.open(path).convert("RGB")) == 0, path


def test_the_handler_module_defines_one_class():
    """TorchServe takes the one class a handler module defines as its service and refuses a
    module with more (the verdict and the face check are functions for that)."""
    assert list_classes_from_module(dog_breeds) == [DogBreedClassifier]


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
    assert cfg["wild_dog_classes"] == [273, 275] and cfg["animal_classes"] == [0, 397]
    assert "dog_threshold" not in cfg
    # Read back by the handler, the dog app's settings are their defaults (the class ranges
    # tuples again, as the verdict and the ImageNet output check use them).
    read = DogBreedSettings.read(cfg)
    for f in fields(DogBreedSettings):
        if f.name not in {g.name for g in fields(HandlerSettings)}:
            assert getattr(read, f.name) == getattr(DogBreedSettings(), f.name), f.name
    assert isinstance(read.wild_dog_classes, tuple)
    model = torch.jit.load(str(dog_export / "model.pt"))
    h = handler_for(dog_export)
    batch, errors, _, _ = h.preprocess([{"body": bytearray(photo_file("dog_labrador").read_bytes())}])
    with torch.inference_mode():
        breeds, imagenet_logits = model(batch)
    assert breeds.shape == (1, 3) and imagenet_logits.shape == (1, 1000)
    assert imagenet.categories()[int(imagenet_logits.argmax())] == "Labrador retriever"


@pytest.mark.slow
def test_a_model_without_imagenet_classes_is_refused(exported, tmp_path):
    export = tmp_path / "plain"
    shutil.copytree(exported, export)
    cfg = yaml.safe_load((export / "model-config.yaml").read_text())
    cfg["handler"].update(name="dog_breeds", dog_classes=[151, 268])
    (export / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(RuntimeError, match="no ImageNet output to tell dogs by"):
        handler_for(export)


class StandInGate(torch.nn.Module):
    """The exported breed model with its ImageNet output replaced: a dog class (207, golden
    retriever) takes nearly all the probability for bright images, an object (504, coffee
    mug) for dark ones."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        imagenet_logits = torch.zeros(x.shape[0], 1000)
        brightness = x.mean(dim=(1, 2, 3))
        imagenet_logits[:, 207] = 20 * brightness
        imagenet_logits[:, 504] = -20 * brightness
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
    dark_face = png_bytes(face.point(lambda v: v // 4))  # the gate says "a cup"
    dog, nothing, dog_with_face, human = classify(h, export, [bright, dark, bright_face, dark_face])
    assert dog["subject"] == "dog" and dog["breed"] == dog["top_k"][0]["label"]
    assert nothing == {"subject": "none", "message": NONE_MESSAGE}
    assert dog_with_face["subject"] == "dog"
    assert human["subject"] == "human" and human["resembles"] == human["top_k"][0]["label"]


# ---- the ImageNet verdict, on made-up probabilities ----


def logits_of(shares: dict[int, float]) -> torch.Tensor:
    """ImageNet logits whose probabilities are ``shares`` ({class: probability}), the rest
    on an object (504, coffee mug)."""
    probs = torch.full((1000,), 1e-12)
    for k, v in shares.items():
        probs[k] = v
    probs[504] += 1 - sum(shares.values())
    return probs.log()


def test_the_verdict_sums_groups_of_classes():
    s = imagenet_shares(logits_of({151: 0.1, 268: 0.15, 273: 0.2, 275: 0.1, 0: 0.05, 397: 0.05}))
    assert s == pytest.approx({"breeds": 0.25, "wild_dogs": 0.3, "animals": 0.65}, abs=1e-6)


@pytest.mark.parametrize(
    "shares, seen",
    [
        # A Rhodesian ridgeback as the classifier sees it: the breeds 0.25, the wild dogs 0.33.
        ({159: 0.25, 274: 0.21, 273: 0.07, 275: 0.05, 281: 0.3}, "dog"),
        ({207: 0.9}, "dog"),
        ({207: 0.2, 504: 0.8}, "dog"),  # dog_min_share, and no other animal
        # A cat with a dog's look: the breeds 0.23, the cats more than the canines.
        ({207: 0.23, 281: 0.52}, "animal"),
        ({274: 0.9}, "animal"),  # wild dogs alone are no dog
        ({207: 0.19}, "other"),  # under dog_min_share and no animal: the face check decides
        ({207: 0.1, 281: 0.3}, "other"),  # a person in a fur hat: animals 0.4 < animal_min_share
        ({281: 0.5}, "animal"),
    ],
)
def test_a_dog_outweighs_the_other_animals_and_an_animal_has_half_the_probability(shares, seen):
    assert verdict(logits_of(shares)) == seen


# ---- the dog app on real photos (../shared/photos) ----


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def dog_app(imagenet_dogs_export, request, tmp_path_factory):
    """The served imagenet_dogs handler (as `make demo` exports it) and ``ask(paths)``:
    {file name: the handler's answer}, through its whole code path (handle), 8 at a time;
    in fp32 and in the export's bf16 copy (run on every CPU, emulated where it has no bf16
    units): the verdicts must hold in both."""
    export = with_precision(imagenet_dogs_export, request.param, tmp_path_factory.mktemp(request.param))
    h = handler_for(export)
    assert h.precision == request.param

    def ask(paths: list[Path]) -> dict[str, dict]:
        out = {}
        for i in range(0, len(paths), 8):
            chunk = paths[i : i + 8]
            out.update(
                zip(
                    (p.name for p in chunk),
                    classify(h, export, [p.read_bytes() for p in chunk]),
                )
            )
        return out

    return h, ask


@pytest.fixture(scope="module")
def people_kinds() -> dict[str, list[Path]]:
    """people/labels.csv's photos by kind."""
    folder = shared_photo("people", "labels.csv").parent
    with (folder / "labels.csv").open(newline="") as f:
        kinds: dict[str, list[Path]] = {}
        for row in csv.DictReader(f):
            kinds.setdefault(row["kind"], []).append(folder / row["file"])
    return kinds


@pytest.fixture(scope="module")
def dog_photos() -> list[Path]:
    """Every dog photo: the Labrador of ../shared/photos and the 56 breeds of dogs/."""
    dogs = sorted(shared_photo("dogs").glob("*.JPEG"))
    assert len(dogs) == 56
    return [shared_photo("dog_labrador.jpg")] + dogs


def subjects(answers: dict[str, dict]) -> dict[str, str]:
    return {name: a["subject"] for name, a in answers.items()}


def test_the_dog_app_finds_the_people(dog_app, people_kinds):
    _, ask = dog_app
    got = subjects(ask(people_kinds["human"]))
    assert len(got) == 52
    # The goal: 98% of the people (51 of 52). Answers are the same on every CPU within the
    # margins of handlers/settings.py and handlers/dog_breeds.py (the ImageNet shares of
    # people are 0.10 at most for the breeds, 0.40 for the animals; the face scores of all
    # but one lie above the threshold by 0.22 or more), so the goal is asserted as it is.
    # The LBP cascade before found 48.
    wrong = {n: s for n, s in got.items() if s != "human"}
    assert len(wrong) <= 1, wrong
    small = subjects(ask(people_kinds["human_small"]))  # reported, not judged: small or turned faces
    print(f"human_small: {sum(s == 'human' for s in small.values())} of {len(small)} human: {small}")


def test_the_dog_app_answers_none_for_animals_and_objects(dog_app, people_kinds):
    _, ask = dog_app
    got = subjects(ask(people_kinds["animal"] + people_kinds["object"] + [shared_photo("kitten.jpg")]))
    assert len(got) == 33
    # The goal: at most 1 of the 32 a person or a dog. Measured: none; every animal's share
    # is 0.69 or more against animal_min_share 0.5, and the objects' face scores lie 0.7
    # below the threshold.
    wrong = {n: s for n, s in got.items() if s != "none"}
    assert len(wrong) <= 1, wrong
    # A dog with a person: either answer is right.
    both = subjects(ask(people_kinds["dog_and_human"]))
    assert both and set(both.values()) <= {"dog", "human"}, both


def test_the_dog_app_calls_every_dog_a_dog(dog_app, dog_photos):
    _, ask = dog_app
    got = ask(dog_photos)
    # Every one: the breeds' share is 0.25 or more (a Rhodesian ridgeback, which the
    # classifier splits with the wild dogs, and which the top class alone called a dhole)
    # against dog_min_share 0.2; the others 0.72 or more.
    wrong = {n: a["subject"] for n, a in got.items() if a["subject"] != "dog"}
    assert not wrong, wrong
    assert got["dog_labrador.jpg"]["breed"] == "Labrador retriever"


def test_an_animal_is_none_whatever_the_face_check_finds(dog_app, people_kinds, dog_photos, monkeypatch):
    """With a face check that finds a face in every image, the verdict still answers the
    animals and the dogs: the face check is asked only about images that are neither."""
    _, ask = dog_app
    monkeypatch.setattr(dog_breeds, "hog_faces", lambda hog, grey, threshold=None: 1)
    animals = subjects(ask(people_kinds["animal"] + [shared_photo("kitten.jpg")]))
    assert set(animals.values()) == {"none"}, animals
    assert set(subjects(ask(people_kinds["object"])).values()) == {"human"}
    assert set(subjects(ask(dog_photos[:8])).values()) == {"dog"}


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
            return client.predict(model, photo_file(name).read_bytes())

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
