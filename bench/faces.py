"""The face check's candidates on real photos: what each finds, and its time per photo.

    python -m bench.faces [--rounds 5] [--out build/bench] [--export export/imagenet_dogs]

The photos: ../shared/photos/people (labels.csv: 52 `human` photos, a face at least about a
tenth of the short side; 14 `human_small`, small or turned faces; 24 `animal` and 8 `object`
photos, no person), each decoded as the dog app decodes it. For each candidate: the `human`
photos with a face found, the `animal` and `object` photos with a face found (false faces),
those left once the ImageNet classifier's verdict has answered the animals (the dog app asks
the face check only about images that are neither a dog nor an animal: handlers/dog_breeds.py's
verdict, from the export's ImageNet output), the `human_small` photos with a face found, and
the time per photo on one thread: each photo's median over the rounds (the candidates take
turns within a round, so that this shared machine's slow minutes hit all), then the median
and the mean over the photos. The handler's choice (handlers/dog_breeds.py count_faces) is
marked. Prints the table and writes <out>/faces.json with the date, the machine and each
candidate's misses and false faces by file.

The candidates run on what requirements.txt installs: OpenCV's LBP cascade (scikit-image's
copy) and Haar cascades (cv2.data), dlib's HOG detector (dlib-bin). docs/performance.md says
why learned detectors are not among them (their packages conflict with these pins, or fetch
their models at run time). The time is that of this machine while it runs, shared or not:
the fastest round's median (each photo's quickest round, then the median over the photos)
shows the cost with the least of other processes' work in it.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import dlib
import numpy as np
from PIL import Image

from bench import report
from handlers import dog_breeds as handler
from handlers.image_classifier import decode
from handlers.preset import EvalPreset
from handlers.settings import DogBreedSettings
from training.demo.photos import SHARED_PHOTOS

PEOPLE = SHARED_PHOTOS / "people"
KINDS = ("human", "human_small", "animal", "object")
# The dog app decodes large JPEGs reduced, keeping the short side at least this (jpeg_draft).
MIN_SHORT = DogBreedSettings().min_short(EvalPreset().resize_size)


@dataclass
class Option:
    """A face check: ``make()`` builds its detectors once, ``count(detectors, image)`` counts."""

    name: str
    make: Callable[[], object]
    count: Callable[[object, Image.Image], int]
    chosen: bool = False
    notes: dict = field(default_factory=dict)


# ---- the candidates ----


def lbp_cascade() -> cv2.CascadeClassifier:
    """OpenCV's LBP frontal-face cascade as scikit-image ships it (the face check before HOG),
    its one misspelt tag (featuhreParams) mended so that OpenCV reads it."""
    import skimage

    text = (Path(skimage.__file__).parent / "data" / "lbpcascade_frontalface_opencv.xml").read_text()
    cascade = cv2.CascadeClassifier()
    storage = cv2.FileStorage(
        text.replace("featuhreParams", "featureParams"), cv2.FILE_STORAGE_READ | cv2.FILE_STORAGE_MEMORY
    )
    if not cascade.read(storage.getFirstTopLevelNode()):
        raise RuntimeError("cannot read scikit-image's LBP face cascade")
    return cascade


def cascade_faces(
    cascade, grey: np.ndarray, min_share: float, scale_factor: float, min_neighbors: int
) -> int:
    """Faces at least ``min_share`` of the short side of ``grey`` that ``cascade`` finds."""
    window = max(cascade.getOriginalWindowSize())
    smallest = max(window, int(min_share * min(grey.shape)))
    if smallest > min(grey.shape):
        return 0
    return len(
        cascade.detectMultiScale(
            grey, scaleFactor=scale_factor, minNeighbors=min_neighbors, minSize=(smallest, smallest)
        )
    )


def haar_cascade(name: str) -> cv2.CascadeClassifier:
    """One of the Haar cascades opencv-python-headless 4.x ships (cv2.data)."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + name)
    if cascade.empty():
        raise RuntimeError(f"cannot load {cv2.data.haarcascades + name}: opencv-python-headless 4.x needed")
    return cascade


def long_side_copy(image: Image.Image, max_side: int) -> np.ndarray:
    """A grey copy at most ``max_side`` long."""
    return handler.grey_copy(image, handler.face_copy_size(image.size, max_side, max_side))


def cascade_option(
    name: str,
    cascade: Callable[[], cv2.CascadeClassifier],
    copy: Callable,
    min_share: float,
    scale_factor: float,
    min_neighbors: int,
    **notes,
) -> Option:
    """A cascade on ``copy(image)``, faces from ``min_share`` of its short side."""
    return Option(
        name,
        cascade,
        lambda c, image: cascade_faces(c, copy(image), min_share, scale_factor, min_neighbors),
        notes=notes,
    )


def lbp_before(image: Image.Image) -> np.ndarray:
    """The copy the LBP check searched before HOG: sized so that a face of 0.15 of the short
    side measured the cascade's 24 px window times 1.15 ** 4 (42 px), at most 512 px long."""
    smallest = 24 * 1.15**4
    scale = min(1.0, 512 / max(image.size), smallest / (0.15 * min(image.size)))
    return handler.grey_copy(image, (max(1, round(image.width * scale)), max(1, round(image.height * scale))))


def hog_option(
    short_side: int, threshold: float, max_side: int = handler.FACE_MAX_SIDE, name: str | None = None
) -> Option:
    """dlib's HOG detector on a copy with ``short_side`` (at most ``max_side`` long)."""

    def count(hog, image):
        return handler.count_faces(hog, image, short_side, max_side, threshold)

    return Option(
        name or f"dlib HOG, short side {short_side}, threshold {threshold:g}",
        dlib.get_frontal_face_detector,
        count,
    )


def chosen_option() -> Option:
    """The handler's check as it runs it (count_faces with its defaults)."""
    return Option(
        f"dlib HOG, short side {handler.FACE_SHORT_SIDE}, threshold "
        f"{handler.FACE_HOG_THRESHOLD:g} (the handler's)",
        handler.face_detector,
        handler.count_faces,
        chosen=True,
    )


def hog_then_lbp_option() -> Option:
    """The handler's check, and the LBP cascade on the same copy (faces from 0.15 of its short
    side, under HOG's window) when HOG finds none: a second opinion for small faces."""

    def count(detectors, image):
        hog, cascade = detectors
        grey = handler.face_copy(image)
        return handler.hog_faces(hog, grey) or cascade_faces(cascade, grey, 0.15, 1.15, 3)

    return Option(
        "the handler's HOG; else LBP on its copy, from 0.15",
        lambda: (handler.face_detector(), lbp_cascade()),
        count,
    )


def options() -> list[Option]:
    """The candidates, the check before HOG first and the handler's last."""
    default, alt2 = "haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml"
    short = handler.FACE_SHORT_SIDE
    return [
        cascade_option(
            "LBP, 0.15 of the short side at 42 px, steps 1.15, 3 hits (the check before)",
            lbp_cascade,
            lbp_before,
            0.15,
            1.15,
            3,
        ),
        cascade_option(
            "LBP, short side 420, from 0.10, steps 1.15, 3 hits",
            lbp_cascade,
            lambda image: handler.face_copy(image, 420, 840),
            0.10,
            1.15,
            3,
        ),
        cascade_option(
            "Haar default, 640 px long, from 0.08, steps 1.1, 5 hits",
            lambda: haar_cascade(default),
            lambda image: long_side_copy(image, 640),
            0.08,
            1.1,
            5,
        ),
        cascade_option(
            "Haar alt2, short side 200, from 0.10, steps 1.1, 3 hits",
            lambda: haar_cascade(alt2),
            lambda image: handler.face_copy(image, 200, 400),
            0.10,
            1.1,
            3,
        ),
        cascade_option(
            "Haar alt2, 400 px long, from 0.10, steps 1.1, 3 hits",
            lambda: haar_cascade(alt2),
            lambda image: long_side_copy(image, 400),
            0.10,
            1.1,
            3,
        ),
        hog_option(640, 0.0, 640, name="dlib HOG, 640 px long, threshold 0"),
        hog_option(320, 0.0, 320, name="dlib HOG, 320 px long, threshold 0"),
        hog_option(240, handler.FACE_HOG_THRESHOLD),
        hog_option(270, handler.FACE_HOG_THRESHOLD),
        hog_option(short, 0.0),
        hog_option(short, -0.5),
        hog_option(330, -0.6),
        hog_then_lbp_option(),
        chosen_option(),
    ]


# ---- the photos ----


def people_photos(folder: Path = PEOPLE) -> dict[str, tuple[str, bytes]]:
    """{file: (kind, bytes)} of labels.csv's photos of the kinds measured."""
    labels = folder / "labels.csv"
    if not labels.exists():
        raise SystemExit(
            f"{labels} is missing: bench.faces needs the real photos of "
            f"../shared/photos/people beside the checkout (see its README)"
        )
    with labels.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] in KINDS]
    return {r["file"]: (r["kind"], (folder / r["file"]).read_bytes()) for r in rows}


def verdicts(export: Path, photos: dict[str, tuple[str, bytes]]) -> dict[str, str]:
    """{file: "dog", "animal" or "-"}: the ImageNet classifier's verdict, as the dog app reads it."""
    from bench.inprocess import load_handler

    h = load_handler(export, threads=1)
    out = {}
    for name, (_, data) in photos.items():
        _, aux, _, _, _ = h.inference(h.preprocess([{"body": bytearray(data)}]))
        seen = handler.verdict(aux[0], h.settings)
        out[name] = "-" if seen == "other" else seen
    return out


def dog_export(export: Path | None, out: Path) -> Path:
    """``export`` if given, else export/imagenet_dogs when `make` wrote it, else one written
    under ``out`` (training.export.pretrained and training.export, as `make` does)."""
    if export is not None:
        return export
    made = Path("export/imagenet_dogs")
    if (made / "model.pt").exists():
        return made
    from training.export import pretrained

    target = out / "imagenet_dogs"
    return target if (target / "model.pt").exists() else pretrained.write_export("imagenet_dogs", out)


# ---- measuring ----


def time_per_photo(
    built: list[tuple[Option, object]], images: dict[str, Image.Image], rounds: int
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """{option: {photo: median ms over the rounds}} and the same with the fastest round;
    the options take turns, the order flipping."""
    times = {o.name: {name: [] for name in images} for o, _ in built}
    by_name = {o.name: (o, d) for o, d in built}
    for option, detector in built:  # warm-up
        option.count(detector, next(iter(images.values())))
    for _, name in report.take_turns(list(by_name), range(rounds)):
        option, detector = by_name[name]
        for photo, image in images.items():
            t0 = time.perf_counter()
            option.count(detector, image)
            times[name][photo].append(1000 * (time.perf_counter() - t0))
    return (
        {o: {p: statistics.median(t) for p, t in per.items()} for o, per in times.items()},
        {o: {p: min(t) for p, t in per.items()} for o, per in times.items()},
    )


def findings(
    option: Option, detector, images: dict[str, Image.Image], kinds: dict[str, str], verdict: dict[str, str]
) -> dict:
    """Photos with a face found, by kind; the misses and the false faces by file."""
    found = {name: option.count(detector, image) > 0 for name, image in images.items()}
    of = lambda kind: [n for n in images if kinds[n] == kind]  # noqa: E731
    false = [n for n in images if kinds[n] in ("animal", "object") and found[n]]
    return {
        "human": sum(found[n] for n in of("human")),
        "human_photos": len(of("human")),
        "human_missed": [n for n in of("human") if not found[n]],
        "false_faces": false,
        "no_person_photos": len(of("animal")) + len(of("object")),
        "false_after_verdict": [n for n in false if verdict[n] == "-"],
        "human_small": sum(found[n] for n in of("human_small")),
        "human_small_photos": len(of("human_small")),
    }


def machine() -> dict:
    info = report.machine()
    info["processor"] = platform.processor()
    info["lscpu_model_name"] = report.lscpu_model()
    info["opencv"], info["dlib"] = cv2.__version__, dlib.__version__
    return info


# ---- output ----


def table(results: dict) -> str:
    first = next(iter(results["options"].values()))
    head = [
        "candidate",
        f"`human` with a face (of {first['human_photos']})",
        f"false faces, `animal` + `object` (of {first['no_person_photos']})",
        "false faces left after the classifier's verdict",
        f"`human_small` with a face (of {first['human_small_photos']})",
        "ms/photo, median",
        "ms/photo, mean",
        "ms/photo, fastest round",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, r in results["options"].items():
        row = [
            f"**{name}**" if r["chosen"] else name,
            str(r["human"]),
            str(len(r["false_faces"])),
            str(len(r["false_after_verdict"])),
            str(r["human_small"]),
            f"{r['ms_median']:.1f}",
            f"{r['ms_mean']:.1f}",
            f"{r['ms_fastest_round_median']:.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, the candidates taking turns")
    p.add_argument("--out", type=Path, default=Path("build/bench"))
    p.add_argument(
        "--export",
        type=Path,
        default=None,
        help="an imagenet_dogs export for the classifier's verdicts (default: "
        "export/imagenet_dogs, else one written under --out)",
    )
    a = p.parse_args(argv)
    cv2.setNumThreads(1)
    import torch

    torch.set_num_threads(1)
    photos = people_photos()
    kinds = {name: kind for name, (kind, _) in photos.items()}
    images = {name: decode({"body": data}, MIN_SHORT).image for name, (_, data) in photos.items()}
    a.out.mkdir(parents=True, exist_ok=True)
    verdict = verdicts(dog_export(a.export, a.out), photos)
    built = [(o, o.make()) for o in options()]
    results = {
        "machine": machine(),
        "rounds": a.rounds,
        "threads": 1,
        "photos": str(PEOPLE),
        "verdicts": verdict,
        "options": {},
    }
    cpu_start = report.cpu_snapshot()
    ms, fastest = time_per_photo(built, images, a.rounds)
    results["steal_during_timing"] = report.steal_share(cpu_start, report.cpu_snapshot())
    for option, detector in built:
        per = ms[option.name]
        results["options"][option.name] = {
            "chosen": option.chosen,
            **option.notes,
            **findings(option, detector, images, kinds, verdict),
            "ms_median": round(statistics.median(per.values()), 2),
            "ms_fastest_round_median": round(statistics.median(fastest[option.name].values()), 2),
            "ms_mean": round(statistics.fmean(per.values()), 2),
            "ms_per_photo": per,
        }
    print(
        f"{results['machine']['lscpu_model_name']}, one thread, median of {a.rounds} rounds, "
        f"{results['machine'].get('date', '')}, load average at start "
        f"{results['machine'].get('load_average_1_5_15_at_start')}\n"
    )
    print(table(results))
    (a.out / "faces.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {a.out / 'faces.json'}")
    return results


if __name__ == "__main__":
    main()
