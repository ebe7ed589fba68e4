"""One preprocessing: what the handler builds equals what evaluation builds."""
from __future__ import annotations

import base64

import pytest
import torch
from PIL import Image

from handlers.image_classifier import ImageClassifier, decode, request_image
from models.presets import BadImage, EvalPreset, open_image
from tests.conftest import png_bytes, split_images
from training.data import load_splits


def test_handler_tensor_equals_evaluation_tensor(tiny_data):
    preset = EvalPreset()
    sets = load_splits(tiny_data, preset.transform(), preset.transform())
    handler = ImageClassifier()
    handler.transform = preset.transform()
    for path in split_images(tiny_data)[:3]:
        idx = [p for p, _ in sets["test"].samples].index(str(path))
        expected = sets["test"][idx][0]
        batch, errors, n, _ = handler.preprocess([{"body": bytearray(path.read_bytes())}])
        assert errors == {} and n == 1
        assert batch.shape == (1, 3, 224, 224)
        assert torch.equal(batch[0], expected)


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
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = open_image(png_bytes(img, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 40)


def test_modes_become_rgb():
    for mode in ("L", "RGBA", "P", "CMYK", "I;16"):
        img = Image.new(mode, (8, 8))
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        assert open_image(png_bytes(img, fmt)).mode == "RGB", mode


@pytest.mark.parametrize("row, message", [
    ({"body": bytearray(b"")}, "the request body is empty"),
    ({"body": {"a": 1}}, "expected image bytes in the request body, got JSON"),
    ({"body": "hello"}, "expected image bytes or base64 in the request body, got text"),
    ({"body": bytearray(b"hello, not an image")},
     "the request body: not a decodable image: unrecognised image format"),
    ({"note": bytearray(b"hello")}, "form field 'note': not a decodable image"),
    ({}, "no image in the request"),
    ({"x": bytearray(b"1"), "y": bytearray(b"2")}, "2 files in one request"),
])
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
    with pytest.raises(BadImage, match="image of 300x200 pixels is over the pixel limit of 59999"):
        open_image(img, max_pixels=59_999)
