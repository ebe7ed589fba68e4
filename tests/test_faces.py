"""The dog-breed handler's face check alone (dlib's HOG frontal-face detector on a small grey
copy): the people of ../shared/photos/people have a face, its animals and objects none, nor
photos without people, odd-sized and odd-mode images. The dog app's whole decision (the
ImageNet verdict first) is tested in tests/test_dog_breeds.py; speed is measured by
``python -m bench.faces``, never asserted here.

The detector's scores are deterministic for a given image (integer resizing by Pillow, then
dlib's float arithmetic, whose rounding differs between instruction sets by far less than
the margins the comments below state), so counts are compared exactly where they can be.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from bench.faces import MIN_SHORT, people_photos
from handlers.dog_breeds import (
    FACE_MAX_SIDE,
    FACE_SHORT_SIDE,
    count_faces,
    face_copy,
    face_copy_size,
    face_detector,
    grey_copy,
    hog_faces,
)
from handlers.image_classifier import decode
from tests.conftest import photo_file, shared_photo

# The astronaut's face box in skimage.data.astronaut() (512 x 512): x, y and side in pixels
# (as OpenCV's Haar cascade draws it: a little larger than dlib's box).
ASTRONAUT_FACE = (176, 65, 98)
WINDOW = 80  # the HOG detector's window, in pixels
# scikit-image's photos with no person (the cameraman, in near profile, is left out).
NO_PERSON = (
    "brick",
    "cell",
    "checkerboard",
    "clock",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)


class Check:
    """The handler's face check as one call: ``count(image)``."""

    def __init__(self):
        self.hog = face_detector()

    def count(self, image: Image.Image) -> int:
        return count_faces(self.hog, image)


@pytest.fixture(scope="module")
def check() -> Check:
    return Check()


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def people() -> dict[str, tuple[str, Image.Image]]:
    """{file: (kind, image)} of ../shared/photos/people, decoded as the dog app decodes them."""
    folder = shared_photo("people", "labels.csv").parent
    return {
        name: (kind, decode({"body": data}, MIN_SHORT).image)
        for name, (kind, data) in people_photos(folder).items()
    }


def photo(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def test_finds_the_people_and_no_face_in_the_animals_and_objects(check, people):
    found = {name: check.count(image) > 0 for name, (_, image) in people.items()}
    of = lambda kind: [n for n, (k, _) in people.items() if k == kind]  # noqa: E731
    humans, animals, objects = of("human"), of("animal"), of("object")
    assert (len(humans), len(animals), len(objects)) == (52, 24, 8)
    # The goal is 98% of the people (51 of 52), and the check finds exactly that: the one it
    # misses (a man in a cap, his face 12% of the short side) scores far below the threshold.
    # The LBP cascade before found 48.
    missed = [n for n in humans if not found[n]]
    assert len(missed) <= 1, missed
    # No face in an object: they score -1.05 at most, 0.7 below the threshold. The animals'
    # highest, a squirrel, is 0.06 below it; the dog app asks the face check about no animal
    # (its ImageNet verdict answers them first), so one found here would not be an answer.
    assert not [n for n in objects if found[n]]
    assert len([n for n in animals if found[n]]) <= 1, [n for n in animals if found[n]]


def test_finds_the_face_in_each_real_portrait_and_none_in_the_cats_and_the_cup(check):
    for name in ("astronaut", "grace_hopper"):
        assert check.count(photo(photo_file(name))) >= 1, name
    for name in ("kitten", "chelsea", "coffee"):
        assert check.count(photo(photo_file(name))) == 0, name


def test_finds_no_face_in_photos_without_people(check):
    found = {
        name: check.count(Image.fromarray(getattr(skimage.data, name)()).convert("RGB")) for name in NO_PERSON
    }
    assert sum(found.values()) == 0, found


def lfw_crop(crop: np.ndarray) -> Image.Image:
    """One of scikit-image's 25 x 25 crops of Labeled Faces in the Wild, enlarged 4x with a
    25 px grey border (the face fills the crop: the detector needs context around it)."""
    face = Image.fromarray((crop * 255).astype(np.uint8)).resize((100, 100), Image.BICUBIC)
    canvas = Image.new("L", (150, 150), 128)
    canvas.paste(face, (25, 25))
    return canvas.convert("RGB")


def test_tells_real_face_crops_from_background_crops(check):
    crops = skimage.data.lfw_subset()  # 100 faces, then 100 background patches
    faces = sum(check.count(lfw_crop(c)) > 0 for c in crops[:100])
    backgrounds = sum(check.count(lfw_crop(c)) > 0 for c in crops[100:])
    # Measured 98 and 0; a few faces in low light or turned may go either way.
    assert faces >= 95 and backgrounds == 0, (faces, backgrounds)


def astronaut_on_canvas(
    astronaut: Image.Image, face_share: float, size: tuple[int, int], where: tuple[float, float]
) -> Image.Image:
    """The whole astronaut photo, shrunk so that her face is ``face_share`` of the canvas's
    short side, pasted onto a grey canvas of ``size`` at ``where`` (0..1 across, 0..1 down)."""
    scale = face_share * min(size) / ASTRONAUT_FACE[2]
    small = astronaut.resize((round(astronaut.width * scale), round(astronaut.height * scale)), Image.BICUBIC)
    canvas = Image.new("RGB", size, (128, 128, 128))
    corner = (round(where[0] * (size[0] - small.width)), round(where[1] * (size[1] - small.height)))
    canvas.paste(small, corner)
    return canvas


@pytest.mark.parametrize("size", [(1200, 900), (900, 1200), (1000, 1000), (1600, 900), (4000, 3000)])
def test_the_smallest_face_found_is_a_share_of_the_short_side(check, astronaut, size):
    """The copy's short side (FACE_SHORT_SIDE) sets the smallest face, whatever the photo's
    size: found from 0.2 of the short side wherever it is, none at 0.15 (a larger copy would
    find it, at a cost that grows with its pixels)."""
    for where in ((0.5, 0.5), (0.1, 0.2), (0.9, 0.9)):
        assert check.count(astronaut_on_canvas(astronaut, 0.22, size, where)) >= 1, where
        assert check.count(astronaut_on_canvas(astronaut, 0.15, size, where)) == 0, where


def test_an_image_smaller_than_the_detectors_window_has_no_face(check, astronaut):
    x, y, side = ASTRONAUT_FACE
    head = astronaut.crop((x - side // 3, y - side // 3, x + side + side // 3, y + side + side // 3))
    assert check.count(head) >= 1
    assert check.count(head.resize((120, 120))) >= 1  # small, yet large enough (found from 100)
    for side in (WINDOW - 1, 8):  # the copy is never enlarged
        assert check.count(head.resize((side, side))) == 0


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1), (3, 20000)])
def test_degenerate_shapes_have_no_face(check, size):
    assert check.count(Image.new("RGB", size, (200, 150, 100))) == 0


def test_any_image_mode_is_checked(check, astronaut):
    assert check.count(Image.new("L", (640, 480), 90)) == 0
    # (A palette image with Pillow's fixed web palette is dithered beyond recognition at this
    # size: its adaptive palette keeps the face.)
    for mode in ("L", "RGBA", "LA", "I", "CMYK"):
        assert check.count(astronaut.convert(mode)) >= 1, mode
    assert check.count(astronaut.convert("P", palette=Image.ADAPTIVE)) >= 1


def test_copy_size_has_the_short_side_and_keeps_the_shape():
    for size in ((4032, 3024), (3024, 4032), (1000, 1000), (800, 450)):
        copy = face_copy_size(size)
        assert min(copy) == FACE_SHORT_SIDE, size
        assert copy[0] / copy[1] == pytest.approx(size[0] / size[1], rel=0.01), size


def test_copy_size_never_enlarges_and_caps_the_long_side():
    assert face_copy_size((200, 150)) == (200, 150)
    assert face_copy_size((1, 5000)) == (1, FACE_MAX_SIDE)
    panorama = face_copy_size((8000, 1000))
    assert max(panorama) == FACE_MAX_SIDE and min(panorama) == round(1000 * FACE_MAX_SIDE / 8000)


def test_the_copy_is_what_the_detector_searches(check, astronaut):
    grey = face_copy(astronaut)
    assert grey.shape == (FACE_SHORT_SIDE, FACE_SHORT_SIDE) and grey.dtype == np.uint8
    assert hog_faces(check.hog, grey) == check.count(astronaut) >= 1


def test_grey_copy_is_the_grey_image_at_the_asked_size(astronaut):
    assert np.array_equal(grey_copy(astronaut, astronaut.size), np.asarray(astronaut.convert("L")))
    small = grey_copy(astronaut, (300, 200))
    assert small.shape == (200, 300) and small.dtype == np.uint8
    flat = grey_copy(Image.new("RGB", (1000, 800), (10, 200, 30)), (250, 200))
    assert np.all(flat == Image.new("RGB", (1, 1), (10, 200, 30)).convert("L").getpixel((0, 0)))
    # Shrinking filters: 1 px stripes average to mid-grey instead of aliasing to black or white.
    stripes = Image.fromarray(np.tile(np.array([0, 255], np.uint8), (800, 500))).convert("RGB")
    shrunk = grey_copy(stripes, (250, 200)).astype(int)
    assert np.abs(shrunk[2:-2, 2:-2] - 127).max() <= 8
