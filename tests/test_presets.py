"""One preprocessing: what the handler builds is what evaluation builds, within stated tolerances."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from handlers.decode import BadImage, decode_image, open_image
from handlers.image_classifier import ImageClassifier, decode, request_image
from handlers.preset import EvalPreset
from handlers.settings import HandlerSettings
from models.augment import TrainPreset
from tests.conftest import FLOAT_ROUNDING, ONE_GREY_LEVEL, photo_jpeg, png_bytes, split_images
from training.data.datasets import load_splits


def assert_within_one_grey_level(got: torch.Tensor, want: torch.Tensor, share: float = 0.005):
    """Equal but for float rounding, except at most ``share`` of the values, which may be one
    grey level off (the one-pass resample's region corners are 32-bit floats in PIL). A crop
    one pixel off, or a different filter, changes most values of a photo by more."""
    diff = (got - want).abs()
    assert diff.max() <= ONE_GREY_LEVEL + FLOAT_ROUNDING, diff.max()
    assert (diff > FLOAT_ROUNDING).float().mean() <= share, (diff > FLOAT_ROUNDING).float().mean()


def test_handler_tensor_matches_evaluation_tensor(tiny_data):
    """Where no reduced decoding happens (these JPEGs are 256 px, under twice the reduced
    decode's minimum short side, default jpeg_draft x 256 = 320), the handler's tensor is
    evaluation's within one grey level."""
    preset = EvalPreset()
    sets = load_splits(tiny_data, preset.transform(), preset.transform())
    handler = ImageClassifier()
    handler.preset = preset
    handler.min_short = round(HandlerSettings.jpeg_draft * preset.resize_size)
    for path in split_images(tiny_data)[:3]:
        idx = [p for p, _ in sets["test"].samples].index(str(path))
        expected = sets["test"][idx][0]
        batch, errors, n, _ = handler.preprocess([{"body": bytearray(path.read_bytes())}])
        assert errors == {} and n == 1
        assert batch.shape == (1, 3, 224, 224)
        assert_within_one_grey_level(batch[0], expected)


def test_eval_preset_is_resize_256_center_crop_224_imagenet():
    p = EvalPreset()
    names = [type(t).__name__ for t in p.transform().transforms]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert (p.resize_size, p.crop_size) == (256, 224)
    assert p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)


def test_preset_round_trips_through_model_config_dict():
    p = EvalPreset(resize_size=160, crop_size=128, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert EvalPreset.from_dict({**p.to_dict(), "top_k": 3}) == p


def test_exif_orientation_is_applied():
    """Orientation 6 (turned 90 degrees clockwise to display): the stored top-left corner is
    seen at the top right. A turn the other way keeps the size but puts it at the bottom left
    (tests/test_decode.py tries all eight orientations)."""
    arr = np.full((20, 40, 3), 255, np.uint8)
    arr[:8, :8] = (220, 0, 0)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    decoded = np.asarray(open_image(png_bytes(img, "JPEG", quality=95, exif=exif.tobytes())))
    assert decoded.shape == (40, 20, 3)
    red = decoded[..., 1] < 128
    assert red[:8, 12:].all() and red.sum() == 64, np.argwhere(red)[[0, -1]]


# Two pixels of each mode with the RGB a person sees, by hand; at most one grey level off
# (16-bit 32896 / 257 = 128.0 exactly; JPEG's loss on a flat CMYK block: two levels).
MODE_PIXELS = {
    "L": ([0, 200], [(0, 0, 0), (200, 200, 200)], "PNG", 0),
    "RGBA": ([(10, 20, 30, 255), (10, 20, 30, 0)], [(10, 20, 30), (255, 255, 255)], "PNG", 0),
    "P": ([1, 2], [(9, 99, 199), (250, 5, 60)], "PNG", 0),
    "CMYK": ([(255, 0, 0, 0), (0, 0, 0, 255)], [(0, 255, 255), (0, 0, 0)], "JPEG", 2),
    "I;16": ([65535, 32896], [(255, 255, 255), (128, 128, 128)], "PNG", 0),
}


@pytest.mark.parametrize("mode", MODE_PIXELS)
def test_modes_become_the_rgb_they_show(mode):
    values, want, fmt, tolerance = MODE_PIXELS[mode]
    img = Image.new(mode, (16, 8))
    if mode == "P":
        img.putpalette([0, 0, 0, 9, 99, 199, 250, 5, 60])
    for i, v in enumerate(values):  # 8x8 blocks: JPEG keeps a flat block's colour
        img.paste(v, (8 * i, 0, 8 * i + 8, 8))
    data = png_bytes(img, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    assert Image.open(io.BytesIO(data)).mode == mode
    got = np.asarray(open_image(data), dtype=int)[4, 4::8]
    assert np.abs(got - np.array(want)).max() <= tolerance, got


@pytest.mark.parametrize(
    "row, message",
    [
        ({"body": bytearray(b"")}, "the request body is empty"),
        ({"body": {"a": 1}}, "expected image bytes in the request body, got JSON"),
        ({"body": "hello"}, "expected image bytes or base64 in the request body, got text"),
        (
            {"body": bytearray(b"hello, not an image")},
            "the request body: not a decodable image: unrecognised image format",
        ),
        ({"note": bytearray(b"hello")}, "form field 'note': not a decodable image"),
        ({}, "no image in the request"),
        ({"x": bytearray(b"1"), "y": bytearray(b"2")}, "2 files in one request"),
    ],
)
def test_bad_requests_are_named(row, message):
    with pytest.raises(BadImage, match=message):
        decode(row)


def test_truncated_jpeg_is_bad_image(tiny_data):
    data = split_images(tiny_data)[0].read_bytes()
    with pytest.raises(BadImage, match="not a decodable image"):
        open_image(data[: len(data) // 2])


def test_multipart_field_names():
    img = png_bytes(Image.new("RGB", (4, 4)))
    for field in ("data", "file", "image", "upload"):
        assert request_image({field: bytearray(img)}) == (f"form field '{field}'", img)
    assert request_image({"body": bytearray(img)}) == ("the request body", img)


def test_base64_text_is_decoded():
    img = png_bytes(Image.new("RGB", (4, 4)))
    b64 = base64.b64encode(img).decode()
    assert request_image({"data": b64}) == ("form field 'data'", img)
    assert decode({"body": b64}).size == (4, 4)


def test_pixel_limit_is_checked_before_decoding():
    img = png_bytes(Image.new("L", (300, 200)))
    assert open_image(img, max_pixels=60_000).size == (300, 200)
    message = "^image of 300x200 pixels is over the pixel limit of 59999"
    with pytest.raises(BadImage, match=message) as e:
        open_image(img, max_pixels=59_999)
    assert e.value.reason == "too_large"


# Reduced JPEG decoding (the handler's jpeg_draft), in grey levels of the normalised tensor:
# libjpeg's scaled IDCT averages each 8x8 block where a full decode keeps its pixels and the
# resize averages them, so the two pictures differ at sharp edges by a few grey levels and
# by under one on average (libjpeg-turbo's SIMD paths give the same results on every CPU).
# 6 levels and 0.9 on average leave room for that; a box half a pixel off moves the mean
# by more (test_reduced_decode_box_follows_every_orientation).
DRAFT_MAX_DIFF = 6 * ONE_GREY_LEVEL
DRAFT_MEAN_DIFF = 0.9 * ONE_GREY_LEVEL


def draft_diff(data: bytes, preset: EvalPreset, min_short: int):
    decoded = decode_image(data, min_short=min_short)
    diff = (preset.serve(decoded) - preset.transform()(open_image(data))).abs()
    return decoded, diff.max().item(), diff.mean().item()


@pytest.mark.slow
def test_phone_photo_reduced_decode_is_within_tolerance():
    """3467x2601 rotated by EXIF (orientation 6): 1/8 scale, short side 326 = 1.27 x 256,
    and partial edge pixels (2601 is not a multiple of 8) on the side the rotation moves."""
    preset = EvalPreset()
    data = photo_jpeg(3467, 2601, orientation=6)
    decoded, max_diff, mean_diff = draft_diff(data, preset, round(1.25 * preset.resize_size))
    assert decoded.size == (2601, 3467) and decoded.image.size == (326, 434)
    assert max_diff <= DRAFT_MAX_DIFF and mean_diff <= DRAFT_MEAN_DIFF, (max_diff, mean_diff)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_decode_box_follows_every_orientation(orientation):
    """Small version of the phone photo (1030x770 at 1/4 for a 128 px resize): a box on
    the wrong side of the image shifts the picture by half a pixel and fails the mean."""
    preset = EvalPreset(resize_size=128, crop_size=112)
    decoded, max_diff, mean_diff = draft_diff(photo_jpeg(1030, 770, orientation), preset, 160)
    assert decoded.image.size in ((258, 193), (193, 258))
    assert max_diff <= DRAFT_MAX_DIFF and mean_diff <= DRAFT_MEAN_DIFF, (max_diff, mean_diff)


def test_no_reduced_decode_for_small_jpegs_and_other_formats():
    preset = EvalPreset()
    big_png = png_bytes(Image.open(io.BytesIO(photo_jpeg(1200, 900))))
    for data in (big_png, photo_jpeg(600, 500)):  # 500 < 2 x 320: no reduction possible
        decoded = decode_image(data, min_short=320)
        assert decoded.box is None and decoded.image.size == decoded.size
        assert_within_one_grey_level(preset.serve(decoded), preset.transform()(open_image(data)))


@pytest.mark.parametrize("resize_size, crop_size", [(256, 224), (128, 112), (224, 224), (200, 224)])
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 257), (257, 600), (300, 300)])
def test_one_pass_crop_matches_resize_then_crop(resize_size, crop_size, size):
    """serve() resamples only the centre crop's region; (200, 224) is a crop larger than the
    resized image, which CenterCrop pads, served by the two steps."""
    preset = EvalPreset(resize_size=resize_size, crop_size=crop_size)
    data = photo_jpeg(*size, seed=sum(size))
    got = preset.serve(decode_image(data))
    assert got.shape == (3, crop_size, crop_size)
    assert_within_one_grey_level(got, preset.transform()(open_image(data)))


def test_one_affine_pass_is_to_tensor_and_normalize():
    preset = EvalPreset(mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (31, 17, 3), dtype=np.uint8))
    want = T.Normalize(preset.mean, preset.std)(T.ToTensor()(img))
    got = preset.to_normalized(img)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.allclose(got, want, rtol=0, atol=FLOAT_ROUNDING)


@pytest.mark.slow
def test_large_png_is_box_reduced_within_two_grey_levels():
    """2400x1800 PNG: short side over 4 x 256, so PIL box-reduces by 2 before resampling."""
    preset = EvalPreset()
    data = png_bytes(Image.open(io.BytesIO(photo_jpeg(2400, 1800))), compress_level=1)
    decoded = decode_image(data, min_short=320)
    assert decoded.box is None
    diff = (preset.serve(decoded) - preset.transform()(open_image(data))).abs()
    assert 0 < diff.max() <= 0.04 and diff.mean() <= 0.005  # one grey level is 0.017


def test_resized_size_matches_torchvision():
    preset = EvalPreset()
    for size in ((4000, 3000), (3000, 4000), (257, 1000), (300, 300), (1025, 769)):
        img = Image.new("RGB", size)
        assert preset.resized_size(size) == T.Resize(256)(img).size


def test_to_dict_gives_a_fresh_dict_each_call():
    """Callers edit what to_dict returns (checkpoints, model-config.yaml): no shared copy."""
    for preset in (EvalPreset(), TrainPreset()):
        first = preset.to_dict()
        first["mean" if "mean" in first else "hflip"] = "edited"
        assert "edited" not in preset.to_dict().values()


def test_normalisation_constants_are_computed_once_per_mean_and_std():
    from handlers.preset import _affine

    preset = EvalPreset()
    assert _affine(preset.mean, preset.std) is _affine(preset.mean, preset.std)
