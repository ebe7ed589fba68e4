"""TorchServe handler for the dog-breed app: a dog, a human face, or neither.

Answers, per image (the README documents them):

    {"subject": "dog",   "breed": "...",     "top_k": [...]}
    {"subject": "human", "resembles": "...", "top_k": [...]}
    {"subject": "none",  "message": "no dog or human face found"}

Human faces: OpenCV's Haar cascade haarcascade_frontalface_alt.xml (shipped inside
opencv-python-headless 4.x), run on a grayscale copy whose longer side is at most
``face_max_side`` pixels, so a 12 MP photo costs about what a small one does.

Dogs: when the model has a second output with ImageNet's 1000 classes (trained from
ImageNet weights), a dog is an image whose top ImageNet class is one of the dog
classes 151-268, as in the original project. Without it (models trained from random
weights), the rule falls back on the breed classifier's own confidence: a dog is an
image whose top breed probability reaches ``dog_threshold``; and since confidence is
a weak signal, a face is looked for first. Both settings live in model-config.yaml's
``handler:`` section.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from handlers.image_classifier import ImageClassifier

IMAGENET_DOGS = range(151, 269)  # ImageNet class indices 151..268 are dog breeds
NONE_MESSAGE = "no dog or human face found"


def face_detector():
    path = cv2.data.haarcascades + "haarcascade_frontalface_alt.xml"
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"cannot load the face cascade {path}: opencv-python-headless 4.x needed")
    return cascade


def count_faces(cascade, image: Image.Image, max_side: int = 512) -> int:
    """Frontal faces in ``image``, found on a grayscale copy at most ``max_side`` pixels long."""
    grey = image.convert("L")
    scale = max_side / max(grey.size)
    if scale < 1:
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))))
    return len(cascade.detectMultiScale(np.asarray(grey), scaleFactor=1.1, minNeighbors=5))


class DogBreedClassifier(ImageClassifier):
    """Breed for a dog, the resembling breed for a human face, a message for neither."""

    def initialize(self, context):
        super().initialize(context)
        cfg = self.handler_config
        self.dog_threshold = float(cfg.get("dog_threshold", 0.5))
        self.face_max_side = int(cfg.get("face_max_side", 512))
        self.cascade = face_detector()

    def inspect(self, image: Image.Image) -> int:
        return count_faces(self.cascade, image, self.face_max_side)

    def answer(self, top_k, probs, aux, faces) -> dict:
        best = top_k[0]["label"]
        if aux is not None:  # ImageNet head: the original project's dog detector
            is_dog = int(aux.argmax()) in IMAGENET_DOGS
            if is_dog:
                return {"subject": "dog", "breed": best, "top_k": top_k}
            if faces:
                return {"subject": "human", "resembles": best, "top_k": top_k}
        else:  # no ImageNet semantics: a face first, then the breed classifier's confidence
            if faces:
                return {"subject": "human", "resembles": best, "top_k": top_k}
            if float(probs.max()) >= self.dog_threshold:
                return {"subject": "dog", "breed": best, "top_k": top_k}
        return {"subject": "none", "message": NONE_MESSAGE}
