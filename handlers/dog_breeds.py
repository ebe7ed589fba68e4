"""TorchServe handler for the dog-breed app: a dog, a human face, or neither.

Answers, per image (the README documents them):

    {"subject": "dog",   "breed": "...",     "top_k": [...]}
    {"subject": "human", "resembles": "...", "top_k": [...]}
    {"subject": "none",  "message": "no dog or human face found"}

Decided in the original app's order, a dog first, with the ImageNet classifier's view of the
whole image in front of the face check. The model's second output holds ImageNet's 1000
classes (training/export/torchscript.py gives every dog-breed model one: its own ImageNet head, or a
pretrained ImageNet network beside it); ``verdict`` sums their probabilities by groups
(the settings in model-config.yaml's ``handler:`` section, handlers/settings.py explains each).
A dog: the breeds have at least ``dog_min_share`` and, with the wild dogs, outweigh the other
animals. Not a dog but an animal: "none", whatever the face check would find in a cat's or a
monkey's face. Otherwise a human when the face check finds a face: dlib's HOG frontal-face
detector (its model is compiled into dlib-bin's library: nothing to download) on a small grey
copy, made while the decoded image is at hand.
``python -m bench.faces`` compares face checks on real photos; docs/performance.md says why
this one.
"""

from __future__ import annotations

import dlib
import numpy as np
import torch
from PIL import Image

from handlers.image_classifier import ImageClassifier
from handlers.settings import DogBreedSettings

NONE_MESSAGE = "no dog or human face found"
NOTHING_TO_EXPLAIN = "no dog or human face found, so no breed was chosen: there is no answer to explain"


# The verdict and the face check live here, in the runtime, not in models/: the archive
# ships the handlers package only (serving/archive.py), and a TorchServe worker imports
# nothing else from the project. They are functions: TorchServe takes the
# one class a handler module defines as its service, and refuses a module with more.
def share(probs: torch.Tensor, classes: tuple[int, int]) -> float:
    """The summed probability of ImageNet classes ``classes`` (first, last inclusive)."""
    first, last = classes
    return float(probs[first : last + 1].sum())


def imagenet_shares(logits: torch.Tensor, settings: DogBreedSettings = DogBreedSettings()) -> dict:
    """One image's 1000 ImageNet logits as probabilities summed by groups of classes:
    {"breeds": the dog breeds, "wild_dogs": dingo, dhole, African hunting dog,
    "animals": every animal, the two above included} (the groups are ``settings``')."""
    probs = logits.float().softmax(dim=-1)
    return {
        "breeds": share(probs, settings.dog_classes),
        "wild_dogs": share(probs, settings.wild_dog_classes),
        "animals": share(probs, settings.animal_classes),
    }


def verdict(logits: torch.Tensor, settings: DogBreedSettings = DogBreedSettings()) -> str:
    """What ImageNet's classes say about an image: "dog" when the breeds have at least
    ``dog_min_share`` and, with the wild dogs, more than the other animals (cats, foxes,
    wolves, ...); else "animal" when the animals have at least ``animal_min_share``; else
    "other" (a person, an object: the face check decides)."""
    s = imagenet_shares(logits, settings)
    canine = s["breeds"] + s["wild_dogs"]
    if s["breeds"] >= settings.dog_min_share and canine > s["animals"] - canine:
        return "dog"
    return "animal" if s["animals"] >= settings.animal_min_share else "other"


# The face check's settings; python -m bench.faces measures them on ../shared/photos/people.
# The grey copy's short side. dlib's HOG detector scans an 80 px window over a pyramid of the
# copy (steps of 5/6), so it finds faces from about a fifth of this side up (the astronaut's
# face pasted into larger photos: found from 0.2 of the short side, missed at 0.15). 300
# finds 51 of the 52 people there; 240 and 270 lose people in hats and caps (47 and 50), and
# the cost grows with the copy's pixels (the search alone: about 6, 7 and 10 ms a photo).
FACE_SHORT_SIDE = 300
# The grey copy's long side at most, whatever its short side: bounds the work on a panorama.
FACE_MAX_SIDE = DogBreedSettings.face_max_side
# dlib's adjust_threshold: the detector's own faces score above 0. At short side 300 the real
# faces that score below 0 are a flute player (-0.13) and a swimmer in a cap (-0.05), and
# scikit-image's astronaut scores -0.31; the highest score in the 24 animals is a squirrel's
# (-0.41), in the 8 objects -1.05. Any threshold from -0.32 to -0.4 finds the astronaut and
# 51 of the 52 people, and no face in the 32 animals and objects; the one left out (a man in
# a cap, his face 12% of the short side) scores -0.71, below the squirrel.
FACE_HOG_THRESHOLD = -0.35


def face_copy_size(
    size: tuple[int, int], short_side: int = FACE_SHORT_SIDE, max_side: int = FACE_MAX_SIDE
) -> tuple[int, int]:
    """The size of the grey copy an image of ``size`` (width, height) is searched at: its
    short side ``short_side``, its long side at most ``max_side``; never larger than ``size``."""
    width, height = size
    scale = min(1.0, short_side / min(width, height), max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def grey_copy(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``image`` in grey at ``size``. Converted first, then shrunk: one channel to resample
    instead of three, and a bilinear filter that first reduces a big photo by whole factors."""
    grey = image.convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(grey)


def face_copy(
    image: Image.Image, short_side: int = FACE_SHORT_SIDE, max_side: int = FACE_MAX_SIDE
) -> np.ndarray:
    """The grey copy of ``image`` that the face check searches (``face_copy_size``)."""
    return grey_copy(image, face_copy_size(image.size, short_side, max_side))


def hog_faces(hog, grey: np.ndarray, threshold: float = FACE_HOG_THRESHOLD) -> int:
    """Frontal faces dlib's HOG detector ``hog`` finds in ``grey``, from its window up."""
    faces, _, _ = hog.run(grey, 0, threshold)
    return len(faces)


def face_detector():
    """dlib's HOG frontal-face detector (its model is compiled into the library)."""
    return dlib.get_frontal_face_detector()


def count_faces(
    hog,
    image: Image.Image,
    short_side: int = FACE_SHORT_SIDE,
    max_side: int = FACE_MAX_SIDE,
    threshold: float = FACE_HOG_THRESHOLD,
) -> int:
    """Frontal faces in ``image`` as the face check finds them: ``hog`` (``face_detector``)
    on its grey copy (``face_copy``)."""
    return hog_faces(hog, face_copy(image, short_side, max_side), threshold)


class DogBreedClassifier(ImageClassifier):
    """Breed for a dog, the resembling breed for a human face, a message for neither."""

    settings_class = DogBreedSettings

    def initialize(self, context):
        super().initialize(context)
        self.hog = face_detector()
        self.face_max_side = int(self.settings.face_max_side)
        self._check_imagenet_output()

    def _check_imagenet_output(self) -> None:
        crop = self.preset.crop_size
        with torch.inference_mode():
            out = self.model(torch.zeros(1, 3, crop, crop, device=self.device))
        s = self.settings
        last = max(s.dog_classes[1], s.wild_dog_classes[1], s.animal_classes[1])
        if not isinstance(out, (tuple, list)) or out[1].shape[-1] <= last:
            raise RuntimeError(
                "the model has no ImageNet output to tell dogs by: export it with "
                "training.export --handler dog_breeds, which adds one"
            )

    def inspect(self, image: Image.Image) -> np.ndarray:
        # The small grey copy, made while the decoded image is at hand; searched in answer().
        return face_copy(image, max_side=self.face_max_side)

    def answer(self, top_k, probs, aux, grey) -> dict:
        best = top_k[0]["label"]
        seen = verdict(aux, self.settings)
        if seen == "dog":
            return {"subject": "dog", "breed": best, "top_k": top_k}
        if seen == "other" and hog_faces(self.hog, grey):
            return {"subject": "human", "resembles": best, "top_k": top_k}
        return {"subject": "none", "message": NONE_MESSAGE}

    def explained(self, answer: dict, probs: torch.Tensor, explain) -> dict:
        """The breed's map for a dog or a face (the breed it resembles); for "none", why
        there is none."""
        if answer["subject"] == "none":
            return {**answer, "explanation": None, "why": NOTHING_TO_EXPLAIN}
        return super().explained(answer, probs, explain)
