"""Why a classifier gave its answer: Grad-CAM class activation maps (POST /explanations).

The export adds two methods to the model's TorchScript file (training/export/methods.py):
``cam_features`` (the last convolutional features, C maps of h x w cells: 7 x 7 for a
224 crop through ResNet50, MobileNetV2 or EfficientNet-Lite0) and ``cam_head`` (the
classifier on them). Grad-CAM (Selvaraju et al., 2017) weighs each feature map by the mean
gradient of the explained class's logit with respect to it, sums them and keeps the
positive part: where the evidence for that class lies. ``forward`` is untouched; the
maps cost one more forward and one backward pass, only for the images asked.

The map covers the square the model saw: the centre crop of the image resized to
``resize_size`` (the eval preprocessing). ``explanation`` gives it in the pixels of the
upright image as decoded (EXIF orientation applied), documented in docs/serving.md:

    {"method": "grad-cam", "label": ..., "index": k, "probability": p,
     "box": [left, top, right, bottom],      # the square the model saw, image pixels
     "grid": [[...], ...],                   # rows x cols, 0..1, row 0 at the top of box
     "peak": [x, y],                         # where the map is highest, image pixels (null: all 0)
     "overlay": "<base64 PNG>"}              # when the request asks for it
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from handlers.decode import BadImage, Decoded

CAM_FEATURES = "cam_features"
CAM_HEAD = "cam_head"
METHOD = "grad-cam"
# The request's parameters: the class to explain (a label as the answers spell it, or its
# index) and whether to add the PNG overlay. Each comes as a multipart form field of this
# name, or as the request header X-Explain-<name> (TorchServe passes headers to the
# handler, not the query string).
TARGET_PARAM = "target"
OVERLAY_PARAM = "overlay"
PARAMS = (TARGET_PARAM, OVERLAY_PARAM)
HEADER_PREFIX = "x-explain-"
# The overlay's longest side, in pixels: enough to see what the map covers on a page.
OVERLAY_SIDE = 512
# How strongly the map's colours cover the photo where the map is highest (0: invisible).
OVERLAY_ALPHA = 0.6


class BadTarget(BadImage):
    """The request names a class the model does not have (HTTP 400, like a bad image)."""

    def __init__(self, message: str):
        super().__init__(message, "bad_target")


@dataclass
class Explain:
    """What one /explanations request asks: the class (None: the answer's) and the overlay;
    the decoded image and the model's input, kept for the map (the handler fills them)."""

    target: int | None
    overlay: bool
    decoded: Decoded | None = None
    x: torch.Tensor | None = None


def has_cam(module) -> bool:
    """Whether a loaded TorchScript file carries the two methods Grad-CAM needs."""
    return all(hasattr(module, name) for name in (CAM_FEATURES, CAM_HEAD))


def grad_cam(module, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(map, logits) for one input ``x`` (3 x crop x crop) and class ``index``: the map h x w,
    scaled so that its maximum is 1 (all zeros when no cell holds evidence for the class),
    computed in float32 with gradients whatever the caller's grad mode."""
    with torch.inference_mode(False), torch.enable_grad():
        a = getattr(module, CAM_FEATURES)(x.unsqueeze(0).float().clone()).detach().requires_grad_()
        logits = getattr(module, CAM_HEAD)(a)
        (grad,) = torch.autograd.grad(logits[0, index], a)
    with torch.no_grad():
        cam = (grad.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)[0].relu()
        top = cam.max()
        return (cam / top if top > 0 else cam).cpu(), logits.detach()[0].cpu()


def crop_box(size: tuple[int, int], resize_size: int, crop_size: int) -> tuple[float, ...]:
    """(left, top, right, bottom) in an image of ``size`` (w, h) of the square that Resize
    (short side to ``resize_size``) and CenterCrop(``crop_size``) keep."""
    w, h = size
    side = crop_size * min(w, h) / resize_size
    left, top = (w - side) / 2, (h - side) / 2
    return left, top, left + side, top + side


def peak(cam: torch.Tensor, box: tuple[float, ...]) -> list[float] | None:
    """Where the map is highest, [x, y] in image pixels: the centre of its hottest cell moved
    toward its neighbours by their values (the mean of the 3 x 3 cells' centres around it,
    weighted by the map), a finer estimate than the cell and always inside the box. None
    for a map of zeros: no part of the view holds evidence for the class."""
    rows, cols = cam.shape
    r, c = divmod(int(cam.argmax()), cols)
    r0, r1, c0, c1 = max(r - 1, 0), min(r + 2, rows), max(c - 1, 0), min(c + 2, cols)
    w = cam[r0:r1, c0:c1].float()
    if float(w.sum()) <= 0:
        return None
    ys = torch.arange(r0, r1, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(c0, c1, dtype=torch.float32)[None, :] + 0.5
    y, x = float((w * ys).sum() / w.sum()), float((w * xs).sum() / w.sum())
    left, top, right, bottom = box
    return [round(left + x * (right - left) / cols, 1), round(top + y * (bottom - top) / rows, 1)]


def colours(values: torch.Tensor) -> torch.Tensor:
    """0..1 values as RGB (… x 3, 0..1) on a blue, cyan, green, yellow, red scale."""
    stops = torch.tensor([[0, 0, 1], [0, 1, 1], [0, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    pos = values.clamp(0, 1) * (len(stops) - 1)
    i = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - i)[..., None]
    return stops[i] * (1 - frac) + stops[i + 1] * frac


def overlay_png(decoded: Decoded, cam: torch.Tensor, box: tuple[float, ...]) -> str:
    """The photo (at most OVERLAY_SIDE on its long side) with the map in colour over the box
    it covers, more opaque where the map is higher; base64 PNG. ``box`` is in the pixels of
    the full upright image (``decoded.size``; its ``image`` may be a reduced decode)."""
    size = decoded.size
    scale = min(1.0, OVERLAY_SIDE / max(size))
    w, h = max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
    photo = decoded.image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR, box=decoded.box)
    base = torch.from_numpy(np.asarray(photo).copy()).float() / 255
    left, top, right, bottom = (round(v * scale) for v in box)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, w), min(bottom, h)
    if x1 > x0 and y1 > y0:
        fine = F.interpolate(
            cam[None, None].float(), size=(bottom - top, right - left), mode="bilinear", align_corners=False
        )[0, 0, y0 - top : y1 - top, x0 - left : x1 - left]
        alpha = (OVERLAY_ALPHA * fine.sqrt())[..., None]
        region = base[y0:y1, x0:x1]
        base[y0:y1, x0:x1] = region * (1 - alpha) + colours(fine) * alpha
    out = Image.fromarray((base * 255).round().clamp(0, 255).byte().numpy())
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=1)  # zlib level 1: a tenth of the default's time
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _text(value) -> str:
    """A parameter's value as stripped text: form fields arrive as bytes, headers as str."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    return "" if value is None else str(value).strip()


def parse_target(value, mapping: dict[str, str]) -> int | None:
    """The class a request names (its label as answers spell it, or its index), or None
    for the answer's own; BadTarget saying which classes exist otherwise."""
    text = _text(value)
    if not text:
        return None
    if text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(mapping):
            return index
        raise BadTarget(f"target {index} is not a class index (0 to {len(mapping) - 1})")
    by_label = {label.lower(): int(k) for k, label in mapping.items()}
    if text.lower() in by_label:
        return by_label[text.lower()]
    raise BadTarget(f"target {text!r} is not one of the model's {len(mapping)} class labels, nor an index")


def parameter(name: str, row: dict, headers: dict):
    """The request's parameter ``name``: its form field, else its X-Explain- header (any case)."""
    if row.get(name) is not None:
        return row[name]
    wanted = HEADER_PREFIX + name
    return next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == wanted), None)


def wants_overlay(value) -> bool:
    return _text(value).lower() in ("1", "true", "yes", "on")


def explanation(
    module,
    x: torch.Tensor,
    index: int,
    label: str,
    probability: float,
    size: tuple[int, int],
    geometry: tuple[int, int],
    decoded: Decoded | None = None,
) -> dict:
    """The ``explanation`` of one answer: Grad-CAM of class ``index`` for the model's input
    ``x`` of an image of full upright ``size``, preprocessed with ``geometry`` (resize
    size, crop size); with the overlay when the ``decoded`` image is given."""
    cam, _ = grad_cam(module, x, index)
    box = crop_box(size, *geometry)
    out = {
        "method": METHOD,
        "label": label,
        "index": index,
        "probability": round(probability, 6),
        "box": [round(v, 1) for v in box],
        "grid": [[round(v, 3) for v in row] for row in cam.tolist()],
        "peak": peak(cam, box),
    }
    if decoded is not None:
        out["overlay"] = overlay_png(decoded, cam, box)
    return out
