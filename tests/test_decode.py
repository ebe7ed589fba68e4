"""Every image decodes to the picture a person sees: images of known pixel values in each
mode Pillow opens, against pictures computed here with numpy, without the decoder.

Tolerances are in grey levels of the 8-bit result. "At most 1" is the rounding of a value
that falls between two levels (v / 257, a * c / 255), which Pillow's integer arithmetic and
the hand computation may round differently; any real error (a clip, a wrong scale, a
missing composite) moves most pixels by far more.
"""

from __future__ import annotations

import colorsys
import io
import struct

import numpy as np
import pytest
import torch
import torchvision.io as tvio
from PIL import Image

from handlers.decode import BadImage, decode_image, open_image, to_rgb
from tests.conftest import png_bytes

ROUNDING = 1  # grey levels, see the module docstring


def decoded(data: bytes, min_short: int = 0) -> np.ndarray:
    """The decoder's picture as an int array (h, w, 3)."""
    return np.asarray(decode_image(data, min_short=min_short).image, dtype=int)


def assert_picture(got: np.ndarray, want: np.ndarray, tolerance: float = ROUNDING):
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.abs(got - want)
    assert diff.max() <= tolerance, (diff.max(), np.unravel_index(diff.argmax(), diff.shape))


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(grey)[..., None], 3, axis=-1)


def opened_mode(data: bytes) -> str:
    """The mode Pillow opens ``data`` in: proof that the file holds what the test says."""
    with Image.open(io.BytesIO(data)) as img:
        return img.mode


# -- high bit depths -------------------------------------------------------------------


def gradient_16bit() -> np.ndarray:
    """Every 16-bit level band: 0..65535 in 1024 steps, then random values."""
    ramp = np.linspace(0, 65535, 1024).round()
    noise = np.random.default_rng(0).integers(0, 65536, 1024)
    return np.stack([ramp, noise]).astype(np.uint16).repeat(4, axis=0)  # 8 x 1024


@pytest.mark.parametrize(
    "fmt, dtype, mode",
    [("PNG", "<u2", "I;16"), ("TIFF", "<u2", "I;16"), ("TIFF", ">u2", "I;16B"), ("PPM", "<u2", "I")],
)
def test_16bit_grey_is_scaled_by_its_full_range(fmt, dtype, mode):
    """65535 is white, 257 one grey level: each value v becomes round(v / 257). Pillow's own
    convert("RGB") clips at 255 (a white picture) and a stretch by the image's min/max would
    pass only because this gradient spans the full range, so the second case is darker."""
    for values in (gradient_16bit(), gradient_16bit() // 4):
        data = png_bytes(Image.fromarray(values.astype(dtype)), fmt)
        assert opened_mode(data) == mode
        assert_picture(decoded(data), grey_rgb(np.round(values / 257)))


def tiff_12bit(values: np.ndarray) -> bytes:
    """An uncompressed 12-bit grey TIFF (two pixels in three bytes, most significant first):
    Pillow opens it as I;16 holding 0..4095, and only the file's BitsPerSample says 4095
    is white."""
    h, w = values.shape
    v = values.astype(np.uint32).reshape(-1, 2)
    pixels = (
        np.stack([v[:, 0] >> 4, (v[:, 0] & 15) << 4 | v[:, 1] >> 8, v[:, 1] & 255], axis=1)
        .astype(np.uint8)
        .tobytes()
    )
    entries = [
        (256, w),
        (257, h),
        (258, 12),
        (259, 1),
        (262, 1),
        (273, None),
        (277, 1),
        (278, h),
        (279, len(pixels)),
    ]
    data_at = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, value in entries:
        ifd += struct.pack("<HHII", tag, 4, 1, data_at if value is None else value)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + pixels


def test_12bit_tiff_white_is_its_own_4095():
    values = np.linspace(0, 4095, 512).round().astype(np.uint16).reshape(4, 128)
    data = tiff_12bit(values)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "I;16" and np.asarray(img).max() == 4095
    assert_picture(decoded(data), grey_rgb(np.round(values / 4095 * 255)))


def test_16bit_grey_with_exif_rotation_is_scaled_and_turned():
    values = gradient_16bit()[:, :40]  # 8 x 40, stored
    img = Image.fromarray(values)
    exif = img.getexif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: stored row 0 is the right column
    got = decoded(png_bytes(img, exif=exif.tobytes()))
    assert_picture(got, grey_rgb(np.round(np.rot90(values, -1) / 257)))


def test_float_tiff_of_0_to_1_is_read_as_display_values():
    values = np.concatenate([np.linspace(0, 1, 256), np.random.default_rng(1).random(256)])
    values = values.astype(np.float32).reshape(8, 64)
    data = png_bytes(Image.fromarray(values), "TIFF")
    assert opened_mode(data) == "F"
    assert_picture(decoded(data), grey_rgb(np.round(values * 255)))


@pytest.mark.parametrize(
    "values, fmt, message",
    [
        (np.full((4, 4), 2.0, np.float32), "TIFF", "float samples from 2 to 2"),
        (np.full((4, 4), -0.5, np.float32), "TIFF", "float samples from -0.5"),
        (np.full((4, 4), np.nan, np.float32), "TIFF", "float samples from nan"),
        (np.full((4, 4), 0.5, np.float32), "PPM", "PPM image of F samples"),  # PFM: linear light
        (np.full((4, 4), -3, np.int32), "TIFF", "signed integer samples"),
    ],
)
def test_samples_without_a_defined_black_and_white_are_refused(values, fmt, message):
    data = png_bytes(Image.fromarray(values), fmt)
    with pytest.raises(BadImage, match=message) as e:
        decode_image(data)
    assert e.value.reason == "unknown_range"


def test_32bit_integer_image_of_unknown_white_is_refused():
    data = png_bytes(Image.fromarray(np.full((4, 4), 70000, np.int32)), "IM")
    assert opened_mode(data) == "I"
    with pytest.raises(BadImage, match="no defined white level"):
        decode_image(data)


def test_48bit_rgb_png_keeps_its_colours():
    rgb = np.random.default_rng(2).integers(0, 65536, (8, 16, 3)).astype(">u2")
    # Pillow cannot write 48-bit PNGs; OpenCV writes them as BGR.
    import cv2

    ok, png = cv2.imencode(".png", rgb[..., ::-1].astype(np.uint16))
    assert ok
    assert_picture(decoded(png.tobytes()), np.round(rgb / 257))


# -- transparency: composited on white -------------------------------------------------


def on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255
    return np.round(colour * a + 255 * (1 - a))


RNG = np.random.default_rng(3)
COLOUR = RNG.integers(0, 256, (8, 16, 3))
ALPHA = np.concatenate([np.zeros(16), np.full(16, 255), RNG.integers(0, 256, 96)]).reshape(8, 16)


def test_rgba_png_is_composited_on_white():
    data = png_bytes(Image.fromarray(np.dstack([COLOUR, ALPHA]).astype(np.uint8)))
    assert opened_mode(data) == "RGBA"
    assert_picture(decoded(data), on_white(COLOUR, ALPHA))


def test_grey_alpha_png_is_composited_on_white():
    grey = COLOUR[..., 0]
    data = png_bytes(Image.fromarray(np.dstack([grey, ALPHA]).astype(np.uint8)))
    assert opened_mode(data) == "LA"
    assert_picture(decoded(data), grey_rgb(on_white(grey[..., None], ALPHA)[..., 0]))


def palette_image(n: int = 16) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    palette = RNG.integers(0, 256, (n, 3))
    index = RNG.integers(0, n, (8, 16))
    img = Image.frombytes("P", (16, 8), index.astype(np.uint8).tobytes())
    img.putpalette(palette.astype(np.uint8).tobytes())
    return img, palette, index


def test_palette_png_is_its_palette_colours():
    img, palette, index = palette_image()
    data = png_bytes(img)
    assert opened_mode(data) == "P"
    assert_picture(decoded(data), palette[index], tolerance=0)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_a_transparent_index_shows_white_there(fmt):
    img, palette, index = palette_image()
    data = png_bytes(img, fmt, transparency=5)
    assert opened_mode(data) == "P"
    want = np.where((index == 5)[..., None], 255, palette[index])
    assert_picture(decoded(data), want, tolerance=0)


def test_palette_with_alpha_per_entry_is_composited():
    img, palette, index = palette_image()
    alphas = RNG.integers(0, 256, 16)
    data = png_bytes(img, transparency=alphas.astype(np.uint8).tobytes())
    assert opened_mode(data) == "P"
    assert_picture(decoded(data), on_white(palette[index], alphas[index]))


def test_palette_alpha_tiff_is_composited():
    img, palette, index = palette_image()
    pa = img.convert("PA")
    pa.putalpha(Image.fromarray(ALPHA.astype(np.uint8)))
    data = png_bytes(pa, "TIFF")
    assert opened_mode(data) == "PA"
    assert_picture(decoded(data), on_white(palette[index], ALPHA))


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
def test_pngs_transparent_colour_shows_white(mode):
    """PNG's tRNS for grey and RGB images: one colour (one 16-bit grey) is transparent."""
    if mode == "RGB":
        values, key, want = COLOUR.copy(), (1, 2, 3), COLOUR.copy()
        values[0, :4] = key
        mask = np.all(values == key, axis=-1)
    else:
        values = COLOUR[..., 0] * (257 if mode == "I;16" else 1)
        key = int(values[3, 3])
        mask = values == key
        want = grey_rgb(np.round(values / (257 if mode == "I;16" else 1)))
    img = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.uint8))
    data = png_bytes(img, transparency=key)
    assert opened_mode(data) == mode
    assert_picture(decoded(data), np.where(mask[..., None], 255, want))


@pytest.mark.parametrize("mode", ["RGBa", "La"])
def test_premultiplied_alpha_is_composited(mode):
    """Premultiplied colours (c x a / 255 stored) on white: c_stored + 255 - a. Only made in
    memory (Pillow opens no file in these modes): to_rgb is the decoder's colour step."""
    alpha = ALPHA.astype(int)
    colour = (COLOUR * alpha[..., None] / 255).round().astype(int)  # premultiplied
    bands = [colour[..., i] for i in ((0, 1, 2) if mode == "RGBa" else (0,))] + [alpha]
    img = Image.merge(mode, [Image.fromarray(b.astype(np.uint8)) for b in bands])
    want = colour[..., :3] + (255 - alpha)[..., None]
    if mode == "La":
        want = grey_rgb(want[..., 0])
    # Undoing the premultiplication rounds c to 255 / a steps; a x that / 255 stays in one level.
    assert_picture(np.asarray(to_rgb(img), dtype=int), want)


# -- other modes ------------------------------------------------------------------------


def test_one_bit_image_is_black_and_white():
    bits = RNG.integers(0, 2, (8, 16)).astype(bool)
    data = png_bytes(Image.fromarray(bits))
    assert opened_mode(data) == "1"
    assert_picture(decoded(data), grey_rgb(bits * 255), tolerance=0)


INKS = {  # CMYK -> the RGB a person sees
    "cyan": ((255, 0, 0, 0), (0, 255, 255)),
    "magenta": ((0, 255, 0, 0), (255, 0, 255)),
    "yellow": ((0, 0, 255, 0), (255, 255, 0)),
    "black": ((0, 0, 0, 255), (0, 0, 0)),
    "paper": ((0, 0, 0, 0), (255, 255, 255)),
}


def test_adobe_cmyk_jpeg_shows_its_inks():
    """Photoshop's CMYK JPEGs store inverted ink (255 = none) with an Adobe APP14 marker;
    Pillow writes them so too. torchvision's libjpeg-turbo, asked for the stored values,
    proves the bytes are inverted, so a decoder that did not invert would show the
    complementary colours."""
    names = list(INKS)
    img = Image.new("CMYK", (16 * len(names), 16))
    for i, name in enumerate(names):
        img.paste(INKS[name][0], (16 * i, 0, 16 * i + 16, 16))
    data = png_bytes(img, "JPEG", quality=100)
    assert data[2:4] == b"\xff\xee" and data[6:11] == b"Adobe"
    stored = tvio.decode_jpeg(
        torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=tvio.ImageReadMode.UNCHANGED
    )
    got = decoded(data)
    for i, name in enumerate(names):
        ink, rgb = INKS[name]
        assert stored[:, 8, 16 * i + 8].tolist() == [255 - v for v in ink], name
        # JPEG's quantisation at quality 100 on a flat 16-pixel block: two levels at most.
        assert np.abs(got[8, 16 * i + 8] - rgb).max() <= 2, (name, got[8, 16 * i + 8])


def test_cmyk_tiff_is_converted_by_the_ink_formula():
    """Without a profile, R = (255 - C)(255 - K) / 255, and so on (lossless TIFF)."""
    cmyk = RNG.integers(0, 256, (8, 16, 4))
    data = png_bytes(Image.frombytes("CMYK", (16, 8), cmyk.astype(np.uint8).tobytes()), "TIFF")
    assert opened_mode(data) == "CMYK"
    want = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
    assert_picture(decoded(data), np.round(want))


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0, 1)
    return 255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def test_lab_tiff_greys_follow_lightness():
    """CIELab TIFF (a, b = 0: neutral): L* -> Y -> sRGB, by the CIE formulas."""
    lightness = np.arange(0, 256, 4)  # stored L, 255 = L* 100
    lab = np.stack([lightness, 0 * lightness, 0 * lightness], -1)  # a, b signed: 0 is grey
    img = Image.frombytes("LAB", (len(lightness), 1), lab.astype(np.uint8).tobytes())
    data = png_bytes(img, "TIFF")
    assert opened_mode(data) == "LAB"
    L = lightness * 100 / 255
    y = np.where(L > 8, ((L + 16) / 116) ** 3, L / 903.3)
    # lcms-style 8-bit rounding of L and of the result: one level each way.
    assert_picture(decoded(data), grey_rgb(srgb_encode(y)[None]).round(), tolerance=2)


def test_ycbcr_and_hsv_become_their_rgb():
    """In-memory modes (no file format opens in them): JFIF's YCbCr and colorsys's HSV."""
    ycc = RNG.integers(0, 256, (4, 8, 3))
    y, cb, cr = (ycc[..., i] - (0, 128, 128)[i] for i in range(3))
    want = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
    img = Image.frombytes("YCbCr", (8, 4), ycc.astype(np.uint8).tobytes())
    assert_picture(np.asarray(to_rgb(img), dtype=int), np.clip(want, 0, 255).round())
    hsv = RNG.integers(0, 256, (4, 8, 3))
    want = np.array([[colorsys.hsv_to_rgb(*(px / 255)) for px in row] for row in hsv]) * 255
    img = Image.frombytes("HSV", (8, 4), hsv.astype(np.uint8).tobytes())
    assert_picture(np.asarray(to_rgb(img), dtype=int), want.round())


def test_animated_gif_and_png_give_their_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((200, 0, 0), (0, 0, 200), (0, 200, 0))]
    for fmt in ("GIF", "PNG"):
        data = png_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
        with Image.open(io.BytesIO(data)) as img:
            assert img.n_frames == 3
        assert_picture(decoded(data), np.full((8, 8, 3), (200, 0, 0)))


# -- EXIF orientation: a marked corner lands where the tag says ---------------------------

# Where the stored top-left corner is seen, and the upright size, for a 40x20 image, from
# EXIF's definitions of orientations 1-8 ("0th row is the visual ..., 0th column is ...").
UPRIGHT_CORNER = {
    1: ("top-left", (40, 20)),
    2: ("top-right", (40, 20)),
    3: ("bottom-right", (40, 20)),
    4: ("bottom-left", (40, 20)),
    5: ("top-left", (20, 40)),
    6: ("top-right", (20, 40)),
    7: ("bottom-right", (20, 40)),
    8: ("bottom-left", (20, 40)),
}


def corner_mask(corner: str, size: tuple[int, int], n: int = 8) -> np.ndarray:
    w, h = size
    mask = np.zeros((h, w), bool)
    rows = slice(0, n) if corner.startswith("top") else slice(h - n, h)
    cols = slice(0, n) if corner.endswith("left") else slice(w - n, w)
    mask[rows, cols] = True
    return mask


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "16-bit PNG"])
def test_exif_orientation_puts_the_marked_corner_where_the_tag_says(orientation, fmt):
    """An 8x8 block (one JPEG block, so it keeps its edges) at the stored top-left; every
    orientation gives a different (corner, size) pair, so a turn the wrong way fails."""
    stored = corner_mask("top-left", (40, 20))
    if fmt == "16-bit PNG":
        img = Image.fromarray(np.where(stored, 0, 65535).astype(np.uint16))
    else:
        marked = np.where(stored[..., None], (220, 0, 0), (255, 255, 255))
        img = Image.fromarray(marked.astype(np.uint8))
    exif = img.getexif()
    exif[0x0112] = orientation
    kw = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    got = decoded(png_bytes(img, fmt.split()[-1], exif=exif.tobytes(), **kw))
    corner, size = UPRIGHT_CORNER[orientation]
    marked = got[..., 1] < 128  # red or black, against white
    assert marked.shape == (size[1], size[0])
    assert (marked == corner_mask(corner, size)).all(), (orientation, np.argwhere(marked)[:3])


# -- colour profiles ----------------------------------------------------------------------

D50 = np.array([0.9642, 1.0, 0.8249])
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
D65 = (0.3127, 0.3290)
SRGB_PRIMARIES = [(0.64, 0.33), (0.30, 0.60), (0.15, 0.06)]
P3_PRIMARIES = [(0.680, 0.320), (0.265, 0.690), (0.150, 0.060)]
ADOBE_PRIMARIES = [(0.64, 0.33), (0.21, 0.71), (0.15, 0.06)]
ADOBE_GAMMA = 563 / 256


def xyz(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def rgb_to_xyz(primaries) -> np.ndarray:
    """RGB (linear) -> XYZ for primaries with a D65 white."""
    p = np.stack([xyz(*c) for c in primaries], axis=1)
    return p * np.linalg.solve(p, xyz(*D65))


def icc_profile(name: str, primaries, curve: bytes) -> bytes:
    """A minimal ICC v4 matrix/TRC display profile: colorants adapted to D50 (Bradford), as
    ICC requires, and one tone curve for the three channels."""
    adapt = np.linalg.inv(BRADFORD) @ np.diag((BRADFORD @ D50) / (BRADFORD @ xyz(*D65))) @ BRADFORD
    colorants = adapt @ rgb_to_xyz(primaries)

    def s15(*values):
        return b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    def mluc(text):
        s = text.encode("utf-16-be")
        return b"mluc\0\0\0\0" + struct.pack(">II", 1, 12) + b"enUS" + struct.pack(">II", len(s), 28) + s

    tags = [(b"desc", mluc(name)), (b"cprt", mluc("none")), (b"wtpt", b"XYZ \0\0\0\0" + s15(*D50))]
    tags += [(c + b"XYZ", b"XYZ \0\0\0\0" + s15(*colorants[:, i])) for i, c in enumerate((b"r", b"g", b"b"))]
    tags += [(c + b"TRC", curve) for c in (b"r", b"g", b"b")]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (
        struct.pack(">I", offset + len(body))
        + b"\0" * 4
        + struct.pack(">I", 0x04300000)
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 28
        + s15(*D50)
        + b"\0" * 48
    )
    return header + struct.pack(">I", len(tags)) + table + body


def para(*params) -> bytes:
    """ICC parametric curve of type 3 (sRGB's shape) or, with one parameter, a pure gamma."""
    kind = 3 if len(params) == 5 else 0
    return (
        b"para\0\0\0\0"
        + struct.pack(">HH", kind, 0)
        + b"".join(struct.pack(">i", round(p * 65536)) for p in params)
    )


SRGB_CURVE = para(2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
DISPLAY_P3 = icc_profile("Display P3", P3_PRIMARIES, SRGB_CURVE)
ADOBE_RGB = icc_profile("Adobe RGB (1998)", ADOBE_PRIMARIES, para(ADOBE_GAMMA))
SRGB = icc_profile("sRGB", SRGB_PRIMARIES, SRGB_CURVE)


def in_srgb(stored: np.ndarray, primaries, decode) -> np.ndarray:
    """What sRGB pixels show the colours ``stored`` means in a space of these primaries."""
    linear = decode(stored / 255) @ (np.linalg.solve(rgb_to_xyz(SRGB_PRIMARIES), rgb_to_xyz(primaries))).T
    return srgb_encode(linear)


def srgb_decode(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


# lcms converts through 16-bit fixed point and rounds once to 8 bits; the float computation
# here differs from it by under one level (0.62 at most over random colours, measured).
@pytest.mark.parametrize(
    "profile, primaries, decode",
    [
        (DISPLAY_P3, P3_PRIMARIES, srgb_decode),
        (ADOBE_RGB, ADOBE_PRIMARIES, lambda x: x**ADOBE_GAMMA),
    ],
    ids=["Display P3", "Adobe RGB"],
)
def test_embedded_wide_gamut_profile_is_converted_to_srgb(profile, primaries, decode):
    stored = RNG.integers(0, 256, (16, 32, 3))
    img = Image.fromarray(stored.astype(np.uint8))
    want = in_srgb(stored, primaries, decode).round()
    assert np.abs(want - stored).mean() > 5  # the profile matters for these colours
    assert_picture(decoded(png_bytes(img, icc_profile=profile)), want)
    assert_picture(decoded(png_bytes(img)), stored, tolerance=0)  # untagged: sRGB as stored


def test_profile_is_applied_to_a_reduced_jpeg_too():
    """The handler's reduced decode converts the same colours (flat blocks survive the 1/4
    scale; JPEG's loss at quality 100 adds up to two levels)."""
    colours = RNG.integers(30, 226, (4, 3))
    stored = np.repeat(np.repeat(colours[None], 256, axis=0), 256, axis=1)  # 4 blocks of 256 x 256
    data = png_bytes(
        Image.fromarray(stored.astype(np.uint8)), "JPEG", quality=100, subsampling=0, icc_profile=DISPLAY_P3
    )
    reduced = decode_image(data, min_short=64)
    assert reduced.image.size == (256, 64)
    want = in_srgb(colours, P3_PRIMARIES, srgb_decode)
    got = np.asarray(reduced.image, dtype=int)[32, 32::64]
    assert np.abs(got - want).max() <= ROUNDING + 2, (got, want)


def test_rgb_image_without_profile_or_with_srgb_is_returned_as_it_is():
    """The fast path: no conversion, no copy."""
    img = Image.fromarray(COLOUR.astype(np.uint8))
    assert to_rgb(img) is img
    tagged = Image.open(io.BytesIO(png_bytes(img, icc_profile=SRGB)))
    tagged.load()
    assert tagged.info["icc_profile"] == SRGB and to_rgb(tagged) is tagged
    p3 = Image.open(io.BytesIO(png_bytes(img, icc_profile=DISPLAY_P3)))
    p3.load()
    assert to_rgb(p3) is not p3


def test_unusable_profile_is_ignored_like_a_browser_does():
    """A profile lcms cannot read, or one for RGB in a CMYK image: read untagged."""
    img = Image.fromarray(COLOUR.astype(np.uint8))
    assert_picture(decoded(png_bytes(img, icc_profile=b"not a profile" * 20)), COLOUR, tolerance=0)
    inks = RNG.integers(0, 256, (8, 16, 4)).astype(np.uint8)
    cmyk = Image.frombytes("CMYK", (16, 8), inks.tobytes())
    untagged = decoded(png_bytes(cmyk, "TIFF"))
    assert_picture(decoded(png_bytes(cmyk, "TIFF", icc_profile=DISPLAY_P3)), untagged, tolerance=0)


def test_open_image_is_the_decoder_at_full_size():
    data = png_bytes(Image.fromarray(gradient_16bit()))
    assert (np.asarray(open_image(data), dtype=int) == decoded(data)).all()


def test_gpu_decode_leaves_a_profile_to_convert_to_the_cpu():
    """nvJPEG ignores colour profiles: the handler's GPU path (its tensor decode, run here on
    the CPU) takes an untagged or sRGB JPEG and declines a Display P3 one."""
    from handlers.image_classifier import ImageClassifier
    from handlers.preset import EvalPreset

    h = ImageClassifier()
    h.device, h.preset = torch.device("cpu"), EvalPreset()
    img = Image.fromarray(RNG.integers(0, 256, (64, 64, 3)).astype(np.uint8))
    assert h._decode_on_gpu(png_bytes(img, "JPEG")) is not None
    assert h._decode_on_gpu(png_bytes(img, "JPEG", icc_profile=SRGB)) is not None
    assert h._decode_on_gpu(png_bytes(img, "JPEG", icc_profile=DISPLAY_P3)) is None
