"""TorchServe handler for the dog-breed app: a dog, a human face, or neither.

Answers, per image (the README documents them):

    {"subject": "dog",   "breed": "...",     "top_k": [...]}
    {"subject": "human", "resembles": "...", "top_k": [...]}
    {"subject": "none",  "message": "no dog or human face found"}

Decided in the original app's order. A dog first: the model's second output holds
ImageNet's 1000 classes (training/export.py gives every dog-breed model one: its own
ImageNet head, or a pretrained ImageNet network beside it), and a dog is an image whose
top ImageNet class is a dog breed (``dog_classes`` in model-config.yaml's ``handler:``
section). A face only when it is not a dog: OpenCV's LBP frontal-face cascade (the
lbpcascade_frontalface that scikit-image ships as data), looking for faces at least
``FACE_MIN_SHARE`` of the short side on a small grey copy, made while the decoded image is
at hand and searched only for images that are not dogs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from handlers.image_classifier import ImageClassifier
from models.settings import DogBreedSettings

NONE_MESSAGE = "no dog or human face found"


# The face check's settings (python -m bench.faces compares them with others, and other detectors).
# OpenCV's LBP frontal-face cascade (24 x 24 window), as scikit-image ships it: in bench.faces it
# finds as many faces as OpenCV's best Haar cascade at that one's best settings, in half the time
# (its features are integer comparisons where Haar's are sums of rectangles).
FACE_CASCADE = ("skimage", "data", "lbpcascade_frontalface_opencv.xml")
# Smallest face looked for, as a share of the short side: portraits and a few people, not a crowd.
# The scan's cost grows with 1 / share squared, so this is the setting that buys the speed.
FACE_MIN_SHARE = 0.15
# Face sizes looked for, each 15% larger than the last: 1.2 misses more faces between sizes,
# and 1.1 finds a face in a cat.
FACE_SCALE_FACTOR = 1.15
# The grey copy is sized so that the smallest face measures the cascade's window times
# 1.15 ** 4 (42 px): smaller copies lose the detail the cascade needs near that size, larger ones
# cost more without finding more.
FACE_MIN_STEPS = 4
# Overlapping hits a face needs: 4 loses a few real faces, 2 lets more of a texture's patches through.
FACE_MIN_NEIGHBORS = 3
# The grey copy's longer side at most, whatever its short side: bounds the work on a long panorama.
FACE_MAX_SIDE = DogBreedSettings.face_max_side
# scikit-image's copy of the cascade misspells one tag OpenCV reads (featuhreParams).
_MISSPELT = ("featuhreParams", "featureParams")


def face_cascade_path() -> Path:
    """Where the installed scikit-image keeps the cascade (found without importing it)."""
    package, *parts = FACE_CASCADE
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the face cascade comes with {package}: install requirements.txt")
    return Path(spec.origin).parent.joinpath(*parts)


def face_detector(path: Path | None = None) -> cv2.CascadeClassifier:
    """The face cascade at ``path`` (default: ``face_cascade_path()``), its misspelt tag mended."""
    path = path or face_cascade_path()
    try:
        text = path.read_text()
    except OSError as e:
        raise RuntimeError(f"cannot read the face cascade {path}: {e}") from e
    cascade = cv2.CascadeClassifier()
    try:
        storage = cv2.FileStorage(text.replace(*_MISSPELT), cv2.FILE_STORAGE_READ | cv2.FILE_STORAGE_MEMORY)
        loaded = cascade.read(storage.getFirstTopLevelNode())
    except (cv2.error, SystemError):  # OpenCV's parser reports malformed XML as either
        loaded = False
    if not loaded:
        raise RuntimeError(f"cannot load the face cascade {path}: not an OpenCV cascade")
    return cascade


def face_scan_size(size: tuple[int, int], window: int, max_side: int = FACE_MAX_SIDE,
                   min_share: float = FACE_MIN_SHARE, scale_factor: float = FACE_SCALE_FACTOR,
                   min_steps: int = FACE_MIN_STEPS) -> tuple[int, int]:
    """The size of the grey copy that an image of ``size`` (width, height) is scanned at: the
    smallest face (``min_share`` of the short side) becomes ``window * scale_factor ** min_steps``
    pixels, the longer side at most ``max_side``; never larger than ``size``."""
    width, height = size
    smallest = window * scale_factor ** min_steps
    scale = min(1.0, max_side / max(width, height), smallest / (min_share * min(width, height)))
    return max(1, round(width * scale)), max(1, round(height * scale))


def grey_copy(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``image`` in grey at ``size``. Converted first, then shrunk: one channel to resample
    instead of three, and a bilinear filter that first reduces a big photo by whole factors."""
    grey = image.convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(grey)


def scan_copy(image: Image.Image, window: int, max_side: int = FACE_MAX_SIDE,
              min_share: float = FACE_MIN_SHARE, scale_factor: float = FACE_SCALE_FACTOR,
              min_steps: int = FACE_MIN_STEPS) -> np.ndarray:
    """The grey copy of ``image`` that the face check scans (``face_scan_size``)."""
    return grey_copy(image, face_scan_size(image.size, window, max_side, min_share, scale_factor,
                                           min_steps))


def faces_in(cascade, grey: np.ndarray, min_share: float = FACE_MIN_SHARE,
             scale_factor: float = FACE_SCALE_FACTOR, min_neighbors: int = FACE_MIN_NEIGHBORS) -> int:
    """Frontal faces at least ``min_share`` of the short side of ``grey`` (a ``scan_copy``);
    0 for a copy smaller than the smallest face ``cascade`` can find."""
    window = max(cascade.getOriginalWindowSize())
    smallest = max(window, int(min_share * min(grey.shape)))
    if smallest > min(grey.shape):
        return 0
    faces = cascade.detectMultiScale(grey, scaleFactor=scale_factor, minNeighbors=min_neighbors,
                                     minSize=(smallest, smallest))
    return len(faces)


def count_faces(cascade, image: Image.Image, max_side: int = FACE_MAX_SIDE, *,
                min_share: float = FACE_MIN_SHARE, scale_factor: float = FACE_SCALE_FACTOR,
                min_steps: int = FACE_MIN_STEPS, min_neighbors: int = FACE_MIN_NEIGHBORS) -> int:
    """Frontal faces in ``image`` at least ``min_share`` of its short side, as ``cascade`` finds
    them on a grey copy sized by ``face_scan_size``."""
    window = max(cascade.getOriginalWindowSize())
    grey = scan_copy(image, window, max_side, min_share, scale_factor, min_steps)
    return faces_in(cascade, grey, min_share, scale_factor, min_neighbors)


class DogBreedClassifier(ImageClassifier):
    """Breed for a dog, the resembling breed for a human face, a message for neither."""

    settings_class = DogBreedSettings

    def initialize(self, context):
        super().initialize(context)
        first, last = self.settings.dog_classes
        self.dog_classes = range(first, last + 1)
        self.face_max_side = int(self.settings.face_max_side)
        self.cascade = face_detector()
        self.window = max(self.cascade.getOriginalWindowSize())
        self._check_imagenet_output()

    def _check_imagenet_output(self) -> None:
        crop = self.preset.crop_size
        with torch.inference_mode():
            out = self.model(torch.zeros(1, 3, crop, crop, device=self.device))
        if not isinstance(out, (tuple, list)) or out[1].shape[-1] <= self.dog_classes[-1]:
            raise RuntimeError("the model has no ImageNet output to tell dogs by: export it with "
                               "training.export --handler dog_breeds, which adds one")

    def inspect(self, image: Image.Image) -> np.ndarray:
        # The small grey copy, made while the decoded image is at hand; searched in answer().
        return scan_copy(image, self.window, self.face_max_side)

    def answer(self, top_k, probs, aux, grey) -> dict:
        best = top_k[0]["label"]
        if int(aux.argmax()) in self.dog_classes:
            return {"subject": "dog", "breed": best, "top_k": top_k}
        if faces_in(self.cascade, grey):
            return {"subject": "human", "resembles": best, "top_k": top_k}
        return {"subject": "none", "message": NONE_MESSAGE}
