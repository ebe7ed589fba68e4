"""The eval preset: the one preprocessing definition that training, evaluation and
serving share.

Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize (ImageNet statistics), as in
the original projects. Its parameters travel in the checkpoint and in the archive's
model-config.yaml (``handler:`` section), so the TorchServe handler rebuilds the
transform that evaluation used (computed in fewer steps: within one grey level, see
``EvalPreset.serve``). Training's augmentation is models/augment.py.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

if TYPE_CHECKING:
    from handlers.decode import Decoded

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Serving only: PIL box-reduces an image first when it is at least twice this
# factor times the resize target, then resamples (Image.resize's reducing_gap).
SERVE_REDUCING_GAP = 2.0


def plain_dict(preset) -> dict:
    """A preset's fields as YAML and JSON write them: tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(preset).items()}


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
        return plain_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvalPreset:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(float(x) for x in known[k])
        return cls(**known)

    def transform(self) -> T.Compose:
        return T.Compose(
            [
                T.Resize(self.resize_size),
                T.CenterCrop(self.crop_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(w, h) that T.Resize(resize_size) gives an image of ``size``: short side to
        resize_size, long side truncated, as torchvision computes it."""
        w, h = size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize_size * long / short)
        return (self.resize_size, new_long) if w <= h else (new_long, self.resize_size)

    def serve(self, decoded: Decoded) -> torch.Tensor:
        """The eval transform of a ``Decoded`` image, possibly reduced at decode time.

        One resampling computes only the centre crop: the region of the image that
        Resize + CenterCrop would keep goes straight to crop_size x crop_size at the
        same scale, at about half the cost (docs/serving.md). Within one grey level of
        ``transform()`` for a full-size image whose short side is under 4 x resize_size
        (PIL takes the region's corners as 32-bit floats). Larger ones are first
        box-reduced by an integer factor (PIL's reducing_gap 2: a third of the cost for
        a 12 MP PNG, two grey levels at most). For a reduced JPEG, the region is read
        inside ``box``, the part of the image that holds the full picture, so the
        crop sees the same geometry.
        """
        w, h = self.resized_size(decoded.size)
        c = self.crop_size
        if c > w or c > h:  # CenterCrop pads: the two steps as evaluation runs them
            img = decoded.image.resize(
                (w, h), Image.Resampling.BILINEAR, box=decoded.box, reducing_gap=SERVE_REDUCING_GAP
            )
            img = F.center_crop(img, [c])
        else:
            x0, y0, x1, y1 = decoded.box or (0, 0, *decoded.image.size)
            sx, sy = (x1 - x0) / w, (y1 - y0) / h  # image pixels per resized pixel
            left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))  # as CenterCrop
            region = (x0 + left * sx, y0 + top * sy, x0 + (left + c) * sx, y0 + (top + c) * sy)
            img = decoded.image.resize(
                (c, c), Image.Resampling.BILINEAR, box=region, reducing_gap=SERVE_REDUCING_GAP
            )
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
