"""The dog-breed handler's face check: real portraits have a face; animals, a cup and
odd-shaped images have none. Speed is measured by ``python -m bench.faces``, not here."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from bench.faces import GROUP_SHARES, NO_PERSON, found_from, lfw_crops, no_person_photos
from handlers.dog_breeds import (FACE_MAX_SIDE, FACE_MIN_SHARE, FACE_MIN_STEPS, FACE_SCALE_FACTOR,
                                 count_faces, face_cascade_path, face_detector, face_scan_size,
                                 grey_copy)
from training.photos import photos

PHOTOS = photos()  # the packaged ones, and ../shared/photos' dog and kitten
# The astronaut's face box in skimage.data.astronaut() (512 x 512): x, y and side in pixels.
ASTRONAUT_FACE = (176, 65, 98)
WINDOW = 24  # the LBP cascade's window, in pixels


@pytest.fixture(scope="module")
def cascade():
    cascade = face_detector()
    assert max(cascade.getOriginalWindowSize()) == WINDOW
    return cascade


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


def photo(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def test_finds_the_face_in_each_real_portrait(cascade):
    for name in ("astronaut", "grace_hopper"):
        assert count_faces(cascade, photo(PHOTOS[name])) == 1, name


def test_finds_no_face_in_the_dog_the_cats_and_the_cup(cascade):
    images = {name: photo(PHOTOS[name]) for name in ("dog_labrador", "kitten", "chelsea", "coffee")}
    for name, image in images.items():
        assert count_faces(cascade, image) == 0, name


def test_finds_no_face_in_photos_without_people(cascade):
    found = {name: count_faces(cascade, image) for name, image in no_person_photos().items()}
    assert len(found) == len(NO_PERSON) and sum(found.values()) == 0, found


def test_tells_real_face_crops_from_background_crops(cascade):
    faces, backgrounds = lfw_crops()  # scikit-image's crops of Labeled Faces in the Wild
    assert sum(count_faces(cascade, image) > 0 for image in faces) >= 95
    assert sum(count_faces(cascade, image) > 0 for image in backgrounds) == 0


def astronaut_on_canvas(astronaut: Image.Image, face_share: float, size: tuple[int, int],
                        where: tuple[float, float]) -> Image.Image:
    """The whole astronaut photo, shrunk so that her face is ``face_share`` of the canvas's
    short side, pasted onto a grey canvas of ``size`` at ``where`` (0..1 across, 0..1 down)."""
    scale = face_share * min(size) / ASTRONAUT_FACE[2]
    small = astronaut.resize((round(astronaut.width * scale), round(astronaut.height * scale)), Image.BICUBIC)
    canvas = Image.new("RGB", size, (128, 128, 128))
    corner = (round(where[0] * (size[0] - small.width)), round(where[1] * (size[1] - small.height)))
    canvas.paste(small, corner)
    return canvas


@pytest.mark.parametrize("size", [(1200, 900), (900, 1200), (1000, 1000), (1600, 900), (4000, 3000)])
def test_a_small_face_in_a_large_photo_is_found_and_a_smaller_one_is_not_looked_for(cascade, astronaut, size):
    for where in ((0.5, 0.5), (0.1, 0.2), (0.9, 0.9)):
        # A little above the smallest size looked for: found, wherever it is and whatever the shape.
        assert count_faces(cascade, astronaut_on_canvas(astronaut, FACE_MIN_SHARE + 0.03, size, where)) == 1
        # Below it: not looked for (the check before found such faces, at eight times the cost).
        assert count_faces(cascade, astronaut_on_canvas(astronaut, 0.8 * FACE_MIN_SHARE, size, where)) == 0


def test_an_image_smaller_than_the_smallest_face_has_none(cascade, astronaut):
    x, y, side = ASTRONAUT_FACE
    head = astronaut.crop((x - side // 3, y - side // 3, x + side + side // 3, y + side + side // 3))
    assert count_faces(cascade, head.resize((60, 60))) == 1  # small, yet large enough
    for side in (WINDOW - 1, 8):
        assert count_faces(cascade, head.resize((side, side))) == 0


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1), (3, 20000)])
def test_degenerate_shapes_have_no_face(cascade, size):
    assert count_faces(cascade, Image.new("RGB", size, (200, 150, 100))) == 0


def test_any_image_mode_is_checked(cascade, astronaut):
    assert count_faces(cascade, Image.new("L", (640, 480), 90)) == 0
    for mode in ("L", "RGBA", "P", "LA", "I"):
        assert count_faces(cascade, astronaut.convert(mode)) == 1, mode


def test_scan_size_puts_the_smallest_face_at_the_same_pixel_size():
    smallest = WINDOW * FACE_SCALE_FACTOR ** FACE_MIN_STEPS
    for size in ((4032, 3024), (3024, 4032), (1000, 1000), (800, 450)):
        scan = face_scan_size(size, WINDOW)
        assert FACE_MIN_SHARE * min(scan) == pytest.approx(smallest, abs=0.5), size
        assert scan[0] / scan[1] == pytest.approx(size[0] / size[1], rel=0.01), size


def test_scan_size_never_enlarges_and_caps_the_long_side():
    assert face_scan_size((200, 150), WINDOW) == (200, 150)
    assert face_scan_size((1, 5000), WINDOW) == (1, FACE_MAX_SIDE)
    panorama = face_scan_size((8000, 1000), WINDOW)
    assert max(panorama) == FACE_MAX_SIDE and min(panorama) == 64


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


def test_bench_reports_the_smallest_share_from_which_every_pasted_face_is_found():
    group = {f"{background}@{share:g}": 2 for share in GROUP_SHARES for background in ("cup", "dog")}
    assert found_from(group) == min(GROUP_SHARES)
    group["dog@0.14"] = 1  # one face of two missed: larger ones count only
    assert found_from(group) == 0.16
    group[f"cup@{max(GROUP_SHARES):g}"] = 0
    assert found_from(group) is None


def test_the_cascade_file_is_read_with_its_misspelt_tag_mended(tmp_path):
    text = face_cascade_path().read_text()
    assert "featuhreParams" in text  # scikit-image's copy, which OpenCV cannot read as it is
    assert cv2.CascadeClassifier(str(face_cascade_path())).empty()
    mended = face_detector()
    assert not mended.empty() and mended.getOriginalWindowSize() == (WINDOW, WINDOW)
    correct = tmp_path / "correct.xml"  # a correctly spelt file reads the same
    correct.write_text(text.replace("featuhreParams", "featureParams"))
    assert count_faces(face_detector(correct), photo(PHOTOS["astronaut"])) == 1


def test_a_missing_or_wrong_cascade_file_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="cannot read the face cascade"):
        face_detector(tmp_path / "missing.xml")
    wrong = tmp_path / "wrong.xml"
    wrong.write_text("<?xml version=\"1.0\"?>\n<opencv_storage><x>1</x></opencv_storage>\n")
    with pytest.raises(RuntimeError, match="not an OpenCV cascade"):
        face_detector(wrong)
    (tmp_path / "broken.xml").write_text("<?xml version=\"1.0\"?>\n<opencv_storage><cascade>")
    with pytest.raises(RuntimeError, match="not an OpenCV cascade"):
        face_detector(tmp_path / "broken.xml")


def test_opencvs_plain_code_finds_the_same_faces(cascade):
    """OpenCV picks SIMD code for this CPU; its plain code paths must give the same answers,
    so that the counts above do not hold only for this machine's instruction set."""
    images = [photo(path) for path in PHOTOS.values()] + list(no_person_photos().values())
    optimised = [count_faces(cascade, image) for image in images]
    cv2.setUseOptimized(False)
    try:
        plain_cascade = face_detector()
        plain = [count_faces(plain_cascade, image) for image in images]
    finally:
        cv2.setUseOptimized(True)
    assert plain == optimised and sum(optimised) == 2  # the two portraits, one face each
