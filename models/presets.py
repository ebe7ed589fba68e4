"""The preprocessing, defined once for training, evaluation and serving.

The eval preset is Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize
(ImageNet statistics), as in the original projects. Its parameters travel in
the checkpoint and in the archive's model-config.yaml (``handler:`` section),
so the TorchServe handler rebuilds the transform that evaluation used (computed in
fewer steps: within one grey level, see ``EvalPreset.serve``).
"""
from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass
from typing import BinaryIO

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms as T
from torchvision.transforms import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Serving only: PIL box-reduces an image first when it is at least twice this
# factor times the resize target, then resamples (Image.resize's reducing_gap).
SERVE_REDUCING_GAP = 2.0


@functools.lru_cache(maxsize=8)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) that take 0..255 pixels to Normalize(mean, std)'s output."""
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return 1 / (255 * s), -m / s


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

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(w, h) that T.Resize(resize_size) gives an image of ``size``: short side to
        resize_size, long side truncated, as torchvision computes it."""
        w, h = size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize_size * long / short)
        return (self.resize_size, new_long) if w <= h else (new_long, self.resize_size)

    def serve(self, decoded: "Decoded") -> torch.Tensor:
        """The eval transform of a ``Decoded`` image, possibly reduced at decode time.

        One resampling computes only the centre crop: the region of the image that
        Resize + CenterCrop would keep goes straight to crop_size x crop_size at the
        same scale (a 500x375 photo: 1.9 -> 1.1 ms). Within one grey level of
        ``transform()`` for a full-size image whose short side is under 4 x resize_size
        (PIL takes the region's corners as 32-bit floats). Larger ones are first
        box-reduced by an integer factor (PIL's reducing_gap 2: a 12 MP PNG's resize
        45 -> 15 ms, two grey levels at most). For a reduced JPEG, the region is read
        inside ``box``, the part of the image that holds the full picture, so the
        crop sees the same geometry.
        """
        w, h = self.resized_size(decoded.size)
        c = self.crop_size
        if c > w or c > h:  # CenterCrop pads: the two steps as evaluation runs them
            img = decoded.image.resize((w, h), Image.Resampling.BILINEAR, box=decoded.box,
                                       reducing_gap=SERVE_REDUCING_GAP)
            img = F.center_crop(img, [c])
        else:
            x0, y0, x1, y1 = decoded.box or (0, 0, *decoded.image.size)
            sx, sy = (x1 - x0) / w, (y1 - y0) / h  # image pixels per resized pixel
            left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))  # as CenterCrop
            region = (x0 + left * sx, y0 + top * sy, x0 + (left + c) * sx, y0 + (top + c) * sy)
            img = decoded.image.resize((c, c), Image.Resampling.BILINEAR, box=region,
                                       reducing_gap=SERVE_REDUCING_GAP)
        return self.to_normalized(img)

    def to_normalized(self, img: Image.Image) -> torch.Tensor:
        """ToTensor + Normalize as one affine pass over the 8-bit pixels,
        x / (255 std) - mean / std: within 1e-6 of the two steps, in half the time."""
        scale, shift = _affine(self.mean, self.std)
        return F.pil_to_tensor(img).contiguous().float().mul_(scale).add_(shift)

    def tensor_transform(self, image: torch.Tensor) -> torch.Tensor:
        """The eval transform on a uint8 CHW tensor, on whatever device it is (GPU decoding).

        Same steps as ``transform()`` (antialiased bilinear resize, centre crop,
        normalise), computed in float: close to it, not equal (PIL rounds to 8 bits
        between its two resize passes). With torchvision's CPU JPEG decoder: max 0.017
        (one grey level), mean 0.005 on the normalised tensor (tests/test_speed_options.py).
        """
        x = image.float()
        size = self.resized_size((x.shape[-1], x.shape[-2]))
        x = F.resize(x, [size[1], size[0]], antialias=True)
        x = F.center_crop(x, [self.crop_size]).clamp_(0, 255).div_(255)
        return F.normalize(x, self.mean, self.std)


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


@dataclass(frozen=True)
class Decoded:
    """An upright RGB image, possibly decoded at reduced scale (JPEG draft).

    ``size`` is the full-resolution upright size; ``box`` the region of ``image``
    that holds the whole picture (None: all of it, the image is full size). A
    reduced JPEG's last row and column may be partial pixels: the box leaves them out.
    """

    image: Image.Image
    size: tuple[int, int]
    box: tuple[float, float, float, float] | None = None


# Where a stored-orientation point (x, y) of an image of size (w, h) lands after
# ImageOps.exif_transpose, for each EXIF orientation (PIL's transpose methods).
_ORIENT = {
    2: lambda x, y, w, h: (w - x, y),      # FLIP_LEFT_RIGHT
    3: lambda x, y, w, h: (w - x, h - y),  # ROTATE_180
    4: lambda x, y, w, h: (x, h - y),      # FLIP_TOP_BOTTOM
    5: lambda x, y, w, h: (y, x),          # TRANSPOSE
    6: lambda x, y, w, h: (h - y, x),      # ROTATE_270 (90 degrees clockwise)
    7: lambda x, y, w, h: (h - y, w - x),  # TRANSVERSE
    8: lambda x, y, w, h: (y, w - x),      # ROTATE_90 (90 degrees counter-clockwise)
}


def upright_box(box, size: tuple[int, int], orientation: int):
    """``box`` of a stored image of ``size``, in the coordinates of its upright version."""
    move = _ORIENT.get(orientation)
    if move is None:
        return box
    (x0, y0), (x1, y1) = (move(box[0], box[1], *size), move(box[2], box[3], *size))
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


# The same transpositions on a CHW tensor (GPU decoding has no EXIF step).
_ORIENT_TENSOR = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: x.transpose(-2, -1).flip(-1),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: x.transpose(-2, -1).flip(-2),
}


def orient_tensor(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A CHW image tensor turned upright for its EXIF orientation, as exif_transpose does."""
    move = _ORIENT_TENSOR.get(orientation)
    return image if move is None else move(image)


def _load(img: Image.Image, max_pixels: int, min_short: int) -> Decoded:
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage(f"image of {w}x{h} pixels is over the pixel limit of {max_pixels}",
                       "too_large")
    box = None
    if min_short and min(w, h) >= 2 * min_short:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale, the smallest whose short side is
        # still >= min_short (a square request keeps this independent of orientation).
        # Other formats return None. Most of a phone photo's decoding time goes.
        drafted = img.draft("RGB", (min_short, min_short))
        box = drafted[1] if drafted and img.size != (w, h) else None
    img.load()
    orientation = img.getexif().get(0x0112, 1)
    if box is not None:
        box = upright_box(box, img.size, orientation)
    full = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    # No copy of an image already upright and RGB: exif_transpose and convert("RGB") would
    # each copy it unchanged (a phone photo decoded in full: 36 MB each). The `with` of
    # decode_image closes only the file; Pillow keeps the loaded image usable.
    upright = ImageOps.exif_transpose(img) if orientation != 1 else img
    return Decoded(upright if upright.mode == "RGB" else upright.convert("RGB"), full, box)


def decode_image(source: str | bytes | BinaryIO, max_pixels: int = MAX_PIXELS,
                 min_short: int = 0) -> Decoded:
    """Decode an image file to an upright RGB image; with ``min_short``, reduced at decode.

    A JPEG whose short side is at least twice ``min_short`` is decoded by libjpeg at
    the smallest of 1/2, 1/4, 1/8 scale that keeps its short side >= ``min_short``
    (PIL's Image.draft), which skips most of the decoding work of a large photo.
    Other formats and smaller JPEGs are decoded in full, exactly as ``open_image``.
    Raises BadImage as ``open_image`` does.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as img:
            return _load(img, max_pixels, min_short)
    except Image.DecompressionBombError as e:
        # Pillow refuses images over twice its limit inside Image.open, before our check.
        raise BadImage(f"image is over the pixel limit: {e}", "too_large") from e
    except UnidentifiedImageError as e:
        raise BadImage("not a decodable image: unrecognised image format") from e
    except (OSError, ValueError, SyntaxError) as e:
        # PIL raises OSError for truncated data and ValueError/SyntaxError for some bad headers.
        raise BadImage(f"not a decodable image: {e}") from e


def open_image(source: str | bytes | BinaryIO, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file (path, bytes or file object) to an upright RGB PIL image.

    Used both as the dataset loader and by the handler, so decoding, EXIF
    orientation and colour conversion are the same in training and serving.
    Animated images give their first frame. Raises BadImage with a readable
    reason for anything that is not an image or is larger than ``max_pixels``.
    Always full size: training and evaluation never use reduced decoding.
    """
    return decode_image(source, max_pixels).image
