"""Real photos that arrive with installed packages, for the demo, the tests and the benchmark.

    python -m training.demo.photos            # one path per line

No photo is committed to the project. scikit-image and matplotlib ship a few real
photographs (public domain or free to use, see their packages); a folder of more can be
given, and ``../shared/photos`` beside the checkout is used when it exists (a dog and a
kitten from TorchServe's own examples on the development machines).
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_PHOTOS = ROOT.parent / "shared" / "photos"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def _package_file(package: str, *parts: str) -> Path:
    module = __import__(package)
    return Path(module.__file__).parent.joinpath(*parts)


def packaged() -> dict[str, Path]:
    """Photos inside installed packages, by what they show."""
    return {
        "astronaut": _package_file("skimage", "data", "astronaut.png"),  # a portrait (NASA)
        "grace_hopper": _package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"),
        "chelsea": _package_file("skimage", "data", "chelsea.png"),  # a cat
        "coffee": _package_file("skimage", "data", "coffee.png"),  # a cup of coffee
    }


def photos(folder: Path | None = SHARED_PHOTOS) -> dict[str, Path]:
    """The photos of ``folder`` (by file stem) when it exists, then the packaged ones."""
    found = {}
    if folder is not None and folder.is_dir():
        found = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in PHOTO_SUFFIXES}
    return {**found, **packaged()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="List the real photos the demo answers.")
    p.add_argument(
        "--folder",
        type=Path,
        default=SHARED_PHOTOS,
        help="a folder of more photos (default: ../shared/photos, if it exists)",
    )
    a = p.parse_args(argv)
    for path in photos(a.folder).values():
        print(path)


if __name__ == "__main__":
    main()
