"""The preprocessing, defined once for training, evaluation and serving.

The eval preset is Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize
(ImageNet statistics), as in the original projects. Its parameters travel in
the checkpoint and in the archive's model-config.yaml (``handler:`` section),
so the TorchServe handler rebuilds exactly the transform that evaluation used.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalPreset:
    """Parameters of the eval transform; serialisable to a plain dict."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalPreset":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(float(x) for x in known[k])
        return cls(**known)

    def transform(self) -> T.Compose:
        return T.Compose([
            T.Resize(self.resize_size),
            T.CenterCrop(self.crop_size),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])


@dataclass(frozen=True)
class TrainPreset:
    """Augmentation for training; the crop size and normalisation follow the eval preset."""

    rotation: float = 15.0
    hflip: float = 0.5
    color_jitter: float = 0.0
    scale: tuple[float, float] = (0.5, 1.0)

    def transform(self, eval_preset: EvalPreset) -> T.Compose:
        steps = [
            T.RandomResizedCrop(eval_preset.crop_size, scale=self.scale),
            T.RandomRotation(self.rotation),
            T.RandomHorizontalFlip(self.hflip),
        ]
        if self.color_jitter:
            j = self.color_jitter
            steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
        steps += [T.ToTensor(), T.Normalize(eval_preset.mean, eval_preset.std)]
        return T.Compose(steps)


# Pillow's own default: larger images are refused before any pixel is decoded,
# so a small file that declares 30000x30000 pixels costs nothing.
MAX_PIXELS = 89_478_485


class BadImage(ValueError):
    """The bytes are not an image this project can decode.

    ``reason`` is a short category for metrics: empty, text, json, no_image,
    several_files, undecodable, too_large.
    """

    def __init__(self, message: str, reason: str = "undecodable"):
        super().__init__(message)
        self.reason = reason


def open_image(source: str | bytes | BinaryIO, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file (path, bytes or file object) to an upright RGB PIL image.

    Used both as the dataset loader and by the handler, so decoding, EXIF
    orientation and colour conversion are the same in training and serving.
    Animated images give their first frame. Raises BadImage with a readable
    reason for anything that is not an image or is larger than ``max_pixels``.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"image of {w}x{h} pixels is over the pixel limit of {max_pixels}",
                               "too_large")
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except Image.DecompressionBombError as e:
        # Pillow refuses images over twice its limit inside Image.open, before our check.
        raise BadImage(f"image is over the pixel limit: {e}", "too_large") from e
    except UnidentifiedImageError as e:
        raise BadImage("not a decodable image: unrecognised image format") from e
    except (OSError, ValueError, SyntaxError) as e:
        # PIL raises OSError for truncated data and ValueError/SyntaxError for some bad headers.
        raise BadImage(f"not a decodable image: {e}") from e
