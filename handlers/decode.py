"""Decoding: the picture a person sees, from a file's bytes.

``decode_image`` and ``open_image`` give it upright, 8-bit RGB in sRGB, whatever the
file's mode, bit depth, transparency or colour profile (``to_rgb`` states each rule),
or BadImage where the file does not define that picture.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageCms, UnidentifiedImageError

# Pillow's own default: larger images are refused before any pixel is decoded,
# so a small file that declares 30000x30000 pixels costs nothing.
MAX_PIXELS = 89_478_485


class BadImage(ValueError):
    """The bytes are not an image this project can decode.

    ``reason`` is a short category for metrics: empty, text, json, no_image,
    several_files, undecodable, too_large, unknown_range (samples whose black and white
    the file does not define, see ``to_rgb``).
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
    2: lambda x, y, w, h: (w - x, y),  # FLIP_LEFT_RIGHT
    3: lambda x, y, w, h: (w - x, h - y),  # ROTATE_180
    4: lambda x, y, w, h: (x, h - y),  # FLIP_TOP_BOTTOM
    5: lambda x, y, w, h: (y, x),  # TRANSPOSE
    6: lambda x, y, w, h: (h - y, x),  # ROTATE_270 (90 degrees clockwise)
    7: lambda x, y, w, h: (h - y, w - x),  # TRANSVERSE
    8: lambda x, y, w, h: (y, w - x),  # ROTATE_90 (90 degrees counter-clockwise)
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


# exif_transpose's transpositions, applied to the converted image: Image.convert and
# Image.fromarray drop the TIFF tags and EXIF that exif_transpose would read.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Transparent pixels are shown on white: what a web page puts behind an image by default,
# so the picture classified is the one the uploader saw in the browser. Pillow's
# convert("RGB") would show the colour stored under each transparent pixel instead,
# often black, invisible to anyone looking at the image.
BACKGROUND = (255, 255, 255)

# Integer grey modes: Pillow's 16-bit modes, and "I", 32-bit in memory whatever the file held.
_INTEGER_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")

_SRGB = ImageCms.createProfile("sRGB")


def _tiff_tag(img: Image.Image, tag: int, default: int) -> int:
    value = getattr(img, "tag_v2", {}).get(tag, default)  # TIFF images have tags
    return value[0] if isinstance(value, tuple) else value


def _refuse_measurements(img: Image.Image) -> None:
    """FITS holds measurements and PFM linear light (often over 1): neither says which
    values are black and white on a screen, and a stretch by the image's own range would
    show a different picture for every file."""
    if img.format == "FITS" or (img.format == "PPM" and img.mode == "F"):
        raise BadImage(
            f"{img.format} image of {img.mode} samples: its values are not display "
            "values, so the picture is unknown",
            "unknown_range",
        )


def _white_level(img: Image.Image) -> int:
    """The sample value of white in an integer grey image: 2**bits - 1 for the bits the file
    declares (a 12-bit TIFF's white is 4095), never the image's own maximum, which would
    brighten a dark picture."""
    if img.format == "TIFF":
        if _tiff_tag(img, 339, 1) != 1:  # SampleFormat: 2 is signed, 3 float
            raise BadImage("TIFF of signed integer samples: black and white are undefined", "unknown_range")
        return 2 ** _tiff_tag(img, 258, 16) - 1  # BitsPerSample
    if img.mode != "I" or img.format == "PPM":  # Pillow scales PGM's maxval to 65535
        return 65535
    raise BadImage(f"{img.format} image of 32-bit integer samples: no defined white level", "unknown_range")


def _integer_grey(img: Image.Image) -> Image.Image:
    """L (LA when the file names a transparent grey value) of a 12 to 32-bit grey image,
    each value scaled by 255 / white and rounded: 65535 -> 255, 257 -> 1."""
    white = _white_level(img)
    values = np.asarray(img)
    if values.dtype == np.int32 and white == 2**32 - 1:
        values = values.view(np.uint32)  # unsigned 32-bit TIFF, held as signed by Pillow
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > white:
        raise BadImage(
            f"grey samples from {low} to {high} in an image whose white is {white}", "unknown_range"
        )
    scaled = values.astype(np.float32) * np.float32(255 / white) + np.float32(0.5)
    grey = Image.fromarray(np.floor(scaled).astype(np.uint8))
    key = img.info.get("transparency")
    if not isinstance(key, int):
        return grey
    alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
    return Image.merge("LA", (grey, alpha))


def _float_grey(img: Image.Image) -> Image.Image:
    """L of a 32-bit float image whose values lie in 0..1, value x 255 rounded.

    0..1 is what scientific tools write (scikit-image's img_as_float, tifffile and OpenCV
    from a float array) and read as display values: such a file decodes to the 8-bit
    picture it was made from. Values outside it (HDR radiance, measurements, NaN) have no
    defined white, so the image is refused rather than clipped or stretched: Pillow's
    convert("RGB") reads 0..1 as 0..1 grey levels of 255, a black picture.
    """
    values = np.asarray(img)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (0.0 <= low and high <= 1.0):  # NaN fails both comparisons
        raise BadImage(
            f"float samples from {low:g} to {high:g}: only 0..1 has a defined black and white",
            "unknown_range",
        )
    return Image.fromarray(np.floor(values * 255 + 0.5).astype(np.uint8))


def _eight_bit(img: Image.Image) -> Image.Image:
    """8-bit samples of any image; Pillow's convert clips 16-bit grey at 255 (a white
    picture) and reads floats as 0..255. Other modes are already 8-bit."""
    if img.mode not in _INTEGER_GREY and img.mode != "F":
        return img
    _refuse_measurements(img)
    return _integer_grey(img) if img.mode != "F" else _float_grey(img)


def _split_alpha(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """(colour, alpha or None) of an 8-bit image: alpha bands, premultiplied ones (La,
    RGBa: undone by convert), a palette's transparency and PNG's transparent colour."""
    if not img.has_transparency_data:
        return img, None
    if img.mode in ("L", "LA", "La"):  # kept grey, for a grey ICC profile
        la = img.convert("LA")
        return la.getchannel("L"), la.getchannel("A")
    rgba = img.convert("RGBA")
    return rgba.convert("RGB"), rgba.getchannel("A")


@functools.lru_cache(maxsize=4)
def _probe(mode: str) -> Image.Image:
    """One row of colours spread over the mode's space: every grey, 17 levels a channel of
    RGB, 9 of CMYK."""
    bands = len(mode)
    levels = np.linspace(0, 255, {1: 256, 3: 17, 4: 9}[bands]).round().astype(np.uint8)
    grid = np.stack(np.meshgrid(*[levels] * bands, indexing="ij"), -1).reshape(-1, bands)
    return Image.frombytes(mode, (len(grid), 1), grid.tobytes())


@functools.lru_cache(maxsize=16)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from an embedded ICC profile to sRGB for ``mode`` (RGB, L or CMYK), or
    None where it changes no colour by more than one grey level from the untagged reading
    (an sRGB profile: converting would cost milliseconds for nothing) or where lcms cannot
    use the profile (broken, or for another colour space): the image is then read as
    untagged, as web browsers read it."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        transform = ImageCms.buildTransform(profile, _SRGB, mode, "RGB")
        probe = _probe(mode)
        converted = np.asarray(ImageCms.applyTransform(probe, transform), dtype=np.int16)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
    untagged = np.asarray(probe.convert("RGB"), dtype=np.int16)
    return transform if np.abs(converted - untagged).max() > 1 else None


def needs_colour_conversion(img: Image.Image) -> bool:
    """Whether ``img`` embeds an ICC profile that ``to_rgb`` converts from (not sRGB), so
    that a decoder which ignores profiles would see other colours. Header only: a JPEG's
    profile is read by Image.open."""
    icc = img.info.get("icc_profile")
    return bool(icc) and img.mode in ("RGB", "L", "CMYK") and _srgb_transform(icc, img.mode) is not None


def _to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """RGB in sRGB of an 8-bit image without alpha, through its ICC profile if it has one."""
    if img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")  # P, 1, YCbCr, LAB (D50, as ICC), HSV: no profile of theirs
    transform = _srgb_transform(icc, img.mode) if icc else None
    if transform is not None:
        converted = ImageCms.applyTransform(img, transform)  # a new image: inPlace is False
        assert converted is not None
        return converted
    return img if img.mode == "RGB" else img.convert("RGB")


def _on_background(colour: Image.Image, alpha: Image.Image) -> Image.Image:
    out = Image.new("RGB", colour.size, BACKGROUND)
    out.paste(colour, mask=alpha)
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """The picture ``img`` shows, as 8-bit RGB in sRGB; ``img`` itself when it is one already.

    - 16-bit and 32-bit integer grey: scaled by the white the file defines (2**bits - 1:
      16-bit PNG 65535, a 12-bit TIFF 4095), not by the image's own range.
    - 32-bit float: values 0..1 read as display values; anything else is refused
      (``_float_grey`` says why).
    - Transparency of every kind: composited on white (``BACKGROUND`` says why).
    - An embedded ICC profile: converted to sRGB (lcms, perceptual intent), in training and
      serving alike (both decode here). Phone cameras write Display P3, some cameras Adobe
      RGB. Read as sRGB, such a photo shows duller colours: four photos (scikit-image's
      astronaut, chelsea, coffee, rocket) re-encoded in either space moved their eval tensor
      by 1.8 to 8.4 grey levels on average (95th percentile 4 to 24, at most 34), against the
      one grey level this module holds serving to; a ResNet50 trained on the demo shapes
      changed its top answer on 5 (P3) and 8 (Adobe RGB) of 60 test images so re-encoded,
      and with Adobe RGB was right on 48 of them unconverted, 54 converted. The cost is about
      40 ns a pixel on one core: a 500x375 photo 7 ms more, a 12 MP one decoded in full
      (training, evaluation) 0.5 s more, served (reduced JPEG decode) 6 ms more; the first
      image of each profile 9 ms more (read, build, probe; 16 are kept). An sRGB profile
      costs that probe once and then nothing.
    - CMYK without a profile: Pillow's formula. JPEGs' CMYK is read as Adobe's inverted
      CMYK, marker or not, as libjpeg-turbo (torchvision) and OpenCV read it too.
    - P, 1, YCbCr, LAB, HSV: Pillow's conversions, exact for these (LAB relative to D50, as
      in ICC profiles).
    Raises BadImage (reason unknown_range) where the file does not define black and white.
    """
    if img.mode == "RGB" and not img.has_transparency_data and not needs_colour_conversion(img):
        return img
    colour, alpha = _split_alpha(_eight_bit(img))
    colour = _to_srgb(colour, img.info.get("icc_profile"))
    return colour if alpha is None else _on_background(colour, alpha)


def _load(img: Image.Image, max_pixels: int, min_short: int) -> Decoded:
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage(f"image of {w}x{h} pixels is over the pixel limit of {max_pixels}", "too_large")
    box = None
    if min_short and min(w, h) >= 2 * min_short:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale, the smallest whose short side is
        # still >= min_short (a square request keeps this independent of orientation).
        # Other formats return None. Most of a phone photo's decoding time goes.
        drafted = img.draft("RGB", (min_short, min_short))
        box = drafted[1] if drafted and img.size != (w, h) else None
    img.load()  # an animated image's first frame
    orientation = img.getexif().get(0x0112, 1)
    if box is not None:
        box = upright_box(box, img.size, orientation)
    full = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    # No copy of an image already upright and RGB: to_rgb returns it as it is (a phone
    # photo decoded in full: 36 MB a copy). The `with` of decode_image closes only the
    # file; Pillow keeps the loaded image usable.
    rgb = to_rgb(img)
    return Decoded(rgb.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else rgb, full, box)


def decode_image(source: str | bytes | BinaryIO, max_pixels: int = MAX_PIXELS, min_short: int = 0) -> Decoded:
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
    except BadImage:
        raise  # a ValueError too, already saying what is wrong
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
