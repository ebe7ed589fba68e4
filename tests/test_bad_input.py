"""Bad input against the real server: a correct answer or a 4xx JSON error naming the problem,
never a 5xx, never a dead worker, never a failed neighbour in the batch."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from serving import bad_input
from tests.conftest import MODEL_NAME, assert_answer_matches, assert_same_answer, png_bytes, split_images

pytestmark = pytest.mark.torchserve


@pytest.fixture(scope="module")
def photo(tiny_data) -> Image.Image:
    return Image.open(split_images(tiny_data)[0]).convert("RGB")


@pytest.fixture(scope="module")
def jpeg(tiny_data) -> bytes:
    return split_images(tiny_data)[0].read_bytes()


def post(server, data=None, files=None, content_type=None):
    headers = {"Authorization": f"Bearer {server.keys()['inference']}"}
    if content_type:
        headers["Content-Type"] = content_type
    return requests.post(
        f"{server.inference_url}/predictions/{MODEL_NAME}",
        data=data,
        files=files,
        headers=headers,
        timeout=60,
    )


def messages() -> dict[str, str]:
    """Each refused case's message as the handler's own code computes it in-process
    (serving/bad_input.py, which also writes docs/serving.md's table)."""
    return {case.name: bad_input.message(case) for case in bad_input.cases()}


def worker_pid(server) -> int:
    return server.describe(MODEL_NAME)[0]["workers"][0]["pid"]


def test_each_bad_input_gets_its_documented_400_and_the_worker_lives(server, jpeg):
    """The server answers each case with exactly the message docs/serving.md shows for it:
    the in-process row model of serving/bad_input.py is TorchServe's."""
    pid = worker_pid(server)
    expected = messages()
    for case in bad_input.cases():
        r = post(server, **case.request())
        assert r.status_code == 400, (case.name, r.status_code, r.text)
        body = r.json()
        assert body["code"] == 400 and body["type"] == "BadImage", case.name
        assert body["message"] == expected[case.name], case.name
    assert worker_pid(server) == pid
    assert server.predict(MODEL_NAME, jpeg)["top_k"]


def test_over_max_request_size_is_refused_by_the_front_end(server):
    # TorchServe's front end answers 413 itself (with an empty body) before any worker sees it.
    pid = worker_pid(server)
    r = post(server, data=b"\0" * (21 << 20))
    assert r.status_code == 413
    assert worker_pid(server) == pid


def variants(photo: Image.Image) -> dict[str, tuple[bytes, Image.Image]]:
    """name -> (request bytes, the RGB image the server should classify)."""
    small = photo.resize((64, 48))
    out = {
        "1x1 png": (
            png_bytes(Image.new("RGB", (1, 1), (200, 30, 30))),
            Image.new("RGB", (1, 1), (200, 30, 30)),
        ),
        "rgba png": (png_bytes(photo.convert("RGBA")), photo),
        "webp lossless": (png_bytes(photo, "WEBP", lossless=True), photo),
    }
    # True 16-bit data: grey level g stored as 257 g, so 65535 is white.
    grey = np.asarray(photo.convert("L"))
    grey16 = Image.fromarray(grey.astype(np.uint16) * 257)
    out["16-bit grey png"] = (png_bytes(grey16), Image.fromarray(grey).convert("RGB"))
    # Palette index 0 transparent: shown on white there.
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    shown = np.asarray(pal.convert("RGB")).copy()
    assert (np.asarray(pal) == 0).any()
    shown[np.asarray(pal) == 0] = 255
    out["palette png with transparency"] = (png_bytes(pal, transparency=0), Image.fromarray(shown))
    cmyk = png_bytes(photo.convert("CMYK"), "JPEG", quality=95)
    out["cmyk jpeg"] = (cmyk, Image.open(io.BytesIO(cmyk)).convert("RGB"))
    frames = [small, small.rotate(180)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated gif"] = (gif.getvalue(), Image.open(io.BytesIO(gif.getvalue())).convert("RGB"))
    # Stored sideways with EXIF orientation 6 ("rotate 90 clockwise to display").
    sideways = photo.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    out["exif rotated"] = (png_bytes(sideways, exif=exif.tobytes()), photo)
    return out


def test_formats_are_classified_as_their_decoded_image(server, photo, reference):
    pid = worker_pid(server)
    for data, expected_image in variants(photo).values():
        got = server.predict(MODEL_NAME, data)
        expected = server.predict(MODEL_NAME, png_bytes(expected_image))
        tolerance = reference.expected(png_bytes(expected_image)).tolerance
        assert_same_answer(got, expected, tolerance)
    assert worker_pid(server) == pid


def apart(a, b) -> bool:
    """Whether two reference answers differ by more than both tolerances in some class."""
    return (
        max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) > a.tolerance + b.tolerance
    )


def test_exif_orientation_turns_the_picture_upright_the_right_way(server, tiny_data, reference):
    """A picture stored a quarter turn anticlockwise, tagged 6 ("turn 90 degrees clockwise to
    view"), is answered as the upright picture: not as the stored one (the tag ignored), nor
    as the picture turned the wrong way (upside down)."""
    for path in split_images(tiny_data):
        upright = Image.open(path).convert("RGB")
        sideways = upright.transpose(Image.Transpose.ROTATE_90)
        want, ignored, wrong_way = (
            reference.expected(png_bytes(img))
            for img in (upright, sideways, upright.transpose(Image.Transpose.ROTATE_180))
        )
        if apart(want, ignored) and apart(want, wrong_way):
            break  # the model tells these three turns apart
    else:
        pytest.fail("no test image whose turns the model tells apart")
    exif = Image.Exif()
    exif[0x0112] = 6
    assert_answer_matches(server.predict(MODEL_NAME, png_bytes(sideways, exif=exif.tobytes())), want)


def test_every_bad_kind_in_one_batch_with_good_ones(server, tiny_data, jpeg, reference):
    goods = [p.read_bytes() for p in split_images(tiny_data)[:4]]
    alone = [server.predict(MODEL_NAME, g) for g in goods]
    bads = [case.request() for case in bad_input.cases()]
    jobs = [dict(data=g) for g in goods] + bads
    pid = worker_pid(server)
    with ThreadPoolExecutor(len(jobs)) as ex:
        responses = list(ex.map(lambda kw: post(server, **dict(kw)), jobs))
    codes = [r.status_code for r in responses]
    assert codes == [200] * len(goods) + [400] * len(bads), codes
    assert max(int(r.headers["X-Batch-Size"]) for r in responses[: len(goods)]) > 1
    for r, a, good in zip(responses, alone, goods):
        assert_same_answer(r.json(), a, reference.expected(good).tolerance)
    assert worker_pid(server) == pid
