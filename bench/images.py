"""Photo-like JPEGs for the benchmark, generated (nothing is downloaded).

A flat or purely synthetic image compresses far better than a photo, which would make
decoding unrealistically cheap. These images are smooth colour fields at several scales
(what large objects and lighting look like) plus fine grain (sensor noise and texture),
saved at quality 90: a 500x375 one is ~100 KB and a 4000x3000 one several MB, as real
photos are. The phone photo carries EXIF with orientation 1 (upright), as a phone held
in landscape writes it: decoders still read the tag, but no rotation is needed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# name -> (width, height, EXIF like a phone's)
SIZES = {"500x375": (500, 375, False), "4000x3000": (4000, 3000, True)}
QUALITY = 90


def _field(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """A smooth random RGB field: ``cells`` random colours across, bicubically upsampled."""
    cw, ch = cells, max(2, round(cells * h / w))
    small = rng.uniform(0, 255, (ch, cw, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A photo-like RGB image: gradients at three scales, a vignette and fine grain."""
    rng = np.random.default_rng(seed)
    img = 0.55 * _field(rng, w, h, 3) + 0.30 * _field(rng, w, h, 12) + 0.15 * _field(rng, w, h, 60)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    img *= (1.0 - 0.25 * r2)[..., None]  # lens vignetting
    # Grain: per-pixel noise, partly shared across channels (luminance noise), as sensors give.
    lum = rng.normal(0, 6.0, (h, w, 1)).astype(np.float32)
    chroma = rng.normal(0, 3.0, (h, w, 3)).astype(np.float32)
    img += lum + chroma
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _phone_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "BenchPhone"  # Make
    exif[0x0110] = "Model 12MP"  # Model
    exif[0x0112] = 1  # Orientation: upright
    exif[0x0131] = "bench.images"  # Software
    return exif


def jpeg_bytes(img: Image.Image, exif: bool = False) -> bytes:
    buf = io.BytesIO()
    kw = {"exif": _phone_exif()} if exif else {}
    img.save(buf, "JPEG", quality=QUALITY, **kw)
    return buf.getvalue()


def make_images(out: Path, size: str, count: int = 4, seed: int = 0) -> list[Path]:
    """``count`` different JPEGs of ``size`` (a key of SIZES), cached as files under ``out``;
    returns their paths."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    w, h, exif = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out / f"photo_{size}_{seed + i}.jpg"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(jpeg_bytes(photo(w, h, seed + i), exif))
            tmp.rename(path)
        paths.append(path)
    return paths


def image_args(image_files: dict[str, list[Path]]) -> list[str]:
    """bench.inprocess's ``--images SIZE=FILE,FILE`` options, one per size."""
    args = []
    for size, files in image_files.items():
        args += ["--images", f"{size}=" + ",".join(map(str, files))]
    return args


def read_image_args(specs: list[str]) -> dict[str, list[bytes]]:
    """The images that ``image_args`` named, read: {size: [JPEG bytes]}."""
    images = {}
    for spec in specs:
        size, files = spec.split("=", 1)
        images[size] = [Path(f).read_bytes() for f in files.split(",")]
    return images
