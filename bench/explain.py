"""Do the explanations point at the dog, and what do they cost?

    python -m bench.explain [--placements 5] [--out build/bench]      (make bench-explain)

**Pointing.** Each real dog photo of ../shared/photos/dogs is pasted, its long side half the
canvas's, at known places on square canvases: plain grey, noise, and a photo without a dog
(the objects of ../shared/photos/people, scikit-image's coffee); and beside a real photo of a
person (people/, both sides). Each canvas goes the served way (JPEG bytes, the handler's
decoder and preprocessing, ``handlers.explain.explanation`` for the answer's breed) through
the pretrained dog model (imagenet_dogs, EfficientNet-Lite0's ImageNet weights). A placement
counts as a hit when the map's peak, in the canvas's pixels, falls inside the pasted photo.

**Cost.** On one thread, as a served worker runs, taking turns round by round: the plain
answer's forward pass (the file as served: oneDNN Graph), the explanation's Grad-CAM (a
forward and a backward pass) and the PNG overlay; and the forward pass of the same model
exported without the explanation's methods, to show that they leave it as fast.

Prints the tables and writes build/bench/explain.json and explain.md (the published run:
docs/explanations.md).
"""

from __future__ import annotations

import argparse
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import report
from bench.preprocess import paired_medians_ms
from handlers.decode import MAX_PIXELS, decode_image, open_image
from handlers.explain import crop_box, explanation, grad_cam, overlay_png
from handlers.optimize import optimize
from handlers.preset import EvalPreset
from training.demo.photos import SHARED_PHOTOS, packaged
from training.export import methods, pretrained
from training.export import torchscript as export_mod

CANVAS = 640  # the canvas's side, pixels
DOG_SIDE = CANVAS // 2  # the pasted dog photo's long side
MARGIN = 8  # pixels between a pasted photo and the edge of the square the model sees
BACKGROUNDS = ("plain", "noise", "photo")
PLACES = ("centre", "top left", "top right", "bottom left", "bottom right")


@dataclass(frozen=True)
class Case:
    """One canvas: a dog photo at ``box`` (left, top, right, bottom) on ``background``."""

    dog: str
    background: str
    place: str
    box: tuple[int, int, int, int]
    image: Image.Image


def dog_photos(folder: Path = SHARED_PHOTOS / "dogs") -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def scene_photos(folder: Path = SHARED_PHOTOS / "people") -> list[Path]:
    """Photos without a dog or a person: the objects of people/ (o_*), and coffee."""
    return sorted(folder.glob("o_*")) + [packaged()["coffee"]]


def person_photos(folder: Path = SHARED_PHOTOS / "people") -> list[Path]:
    """Photos of one or two people whose faces are visible (h_*)."""
    return sorted(folder.glob("h_*"))


def fitted(image: Image.Image, long_side: int) -> Image.Image:
    scale = long_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.BILINEAR)


def covering(image: Image.Image, side: int) -> Image.Image:
    """``image`` scaled to cover a side x side square, centre-cropped to it."""
    scale = side / min(image.size)
    img = image.convert("RGB").resize(
        (max(side, round(image.width * scale)), max(side, round(image.height * scale))),
        Image.Resampling.BILINEAR,
    )
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side))


def background(kind: str, seed: int, scenes: list[Path]) -> Image.Image:
    if kind == "plain":
        return Image.new("RGB", (CANVAS, CANVAS), (128, 128, 128))
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (CANVAS, CANVAS, 3), dtype=np.uint8))
    return covering(open_image(scenes[seed % len(scenes)]), CANVAS)


def seen_square(preset: EvalPreset) -> tuple[int, int, int, int]:
    """The part of a canvas the model sees, shrunk by MARGIN: where photos are pasted."""
    left, top, right, bottom = crop_box((CANVAS, CANVAS), preset.resize_size, preset.crop_size)
    return round(left) + MARGIN, round(top) + MARGIN, round(right) - MARGIN, round(bottom) - MARGIN


def place_at(place: str, size: tuple[int, int], square: tuple[int, int, int, int]) -> tuple[int, int]:
    left, top, right, bottom = square
    w, h = size
    x = {"left": left, "right": right - w}.get(place.split()[-1], (left + right - w) // 2)
    y = {"top": top, "bottom": bottom - h}.get(place.split()[0], (top + bottom - h) // 2)
    return x, y


def pasted(canvas: Image.Image, photo: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int, int]:
    canvas.paste(photo, xy)
    return xy[0], xy[1], xy[0] + photo.width, xy[1] + photo.height


def canvases(
    preset: EvalPreset, placements: int, dogs: list[Path] | None = None, seed: int = 0
) -> list[Case]:
    """Every dog (of ``dogs``, default all) on every background at ``placements`` of PLACES
    (chosen in turn)."""
    dogs, scenes = dogs or dog_photos(), scene_photos()
    square = seen_square(preset)
    cases, turn = [], 0
    for i, path in enumerate(dogs):
        dog = fitted(open_image(path), DOG_SIDE)
        for kind in BACKGROUNDS:
            for k in range(placements):
                place = PLACES[(turn + k) % len(PLACES)] if placements < len(PLACES) else PLACES[k]
                canvas = background(kind, seed + 101 * i + k, scenes)
                box = pasted(canvas, dog, place_at(place, dog.size, square))
                cases.append(Case(path.stem, kind, place, box, canvas))
            turn += 1
    return cases


def beside_people(preset: EvalPreset, dogs: list[Path] | None = None) -> list[Case]:
    """Each dog (of ``dogs``, default all) beside a person's photo on a plain canvas, the dog
    left, then right."""
    dogs, people = dogs or dog_photos(), person_photos()
    left, top, right, bottom = seen_square(preset)
    half = (right - left) // 2 - MARGIN
    cases = []
    for i, path in enumerate(dogs):
        dog = fitted(open_image(path), half)
        person = fitted(open_image(people[i % len(people)]), half)
        for side in ("left", "right"):
            canvas = Image.new("RGB", (CANVAS, CANVAS), (128, 128, 128))
            dog_x = left if side == "left" else right - dog.width
            person_x = right - person.width if side == "left" else left
            canvas.paste(person, (person_x, (top + bottom - person.height) // 2))
            box = pasted(canvas, dog, (dog_x, (top + bottom - dog.height) // 2))
            cases.append(
                Case(path.stem, f"person beside ({people[i % len(people)].stem})", side, box, canvas)
            )
    return cases


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def explainer(module, data: bytes, preset: EvalPreset, labels: dict[str, str]):
    """(the answer's class, explain(index)) for one image's bytes, the served way: decoded,
    preprocessed and answered once; ``explain`` gives the explanation of a class."""
    decoded = decode_image(data, MAX_PIXELS)
    x = preset.serve(decoded)
    with torch.inference_mode():
        probs = module(x[None])[0][0].softmax(-1)
    geometry = (preset.resize_size, preset.crop_size)

    def explain(index: int) -> dict:
        return explanation(module, x, index, labels[str(index)], float(probs[index]), decoded.size, geometry)

    return int(probs.argmax()), explain


def _words(name: str) -> str:
    return name.lower().replace("_", " ").replace("-", " ")


def true_breed(dog: str, labels: dict[str, str]) -> int:
    """The class index of a dogs/ photo's breed, from its name (imagenet_<wnid>_<breed>)."""
    by_name = {_words(label): int(k) for k, label in labels.items()}
    return by_name[_words(dog.split("_", 2)[2])]


def inside(point: list[float] | None, box: tuple[int, int, int, int]) -> bool:
    if point is None:  # an all-zero map points nowhere
        return False
    x, y = point
    left, top, right, bottom = box
    return left <= x <= right and top <= y <= bottom


def pointing(module, preset: EvalPreset, labels: dict[str, str], cases: list[Case]) -> list[dict]:
    """Per case: where the peak of the answer's map fell and whether inside the dog's photo,
    whether the answer was the dog's breed, and the same for the map of the dog's breed."""
    rows = []
    for c in cases:
        breed = true_breed(c.dog, labels)
        top, explain = explainer(module, jpeg(c.image), preset, labels)
        answer, right = explain(top), top == breed
        of_breed = answer if right else explain(breed)
        rows.append(
            {
                "dog": c.dog,
                "background": c.background.split(" (")[0],
                "place": c.place,
                "box": list(c.box),
                "answer": answer["label"],
                "peak": answer["peak"],
                "hit": inside(answer["peak"], c.box),
                "right_breed": right,
                "breed_peak": of_breed["peak"],
                "breed_hit": inside(of_breed["peak"], c.box),
            }
        )
    return rows


def rates(rows: list[dict]) -> dict[str, dict[str, int]]:
    """By background, and over all: cases, peaks of the answer's map on the dog, answers
    that were the dog's breed, and peaks of the breed's map on the dog."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        for key in (r["background"], "all"):
            row = out.setdefault(key, {"cases": 0, "hit": 0, "right_breed": 0, "breed_hit": 0})
            row["cases"] += 1
            for k in ("hit", "right_breed", "breed_hit"):
                row[k] += r[k]
    return out


def cost(export_dir: Path, no_cam: Path, preset: EvalPreset, photo: Path, rounds: int) -> dict:
    """Median ms per image on one thread: the plain forward as served, the same without the
    explanation's methods in the file, Grad-CAM, and the overlay."""
    data = photo.read_bytes()
    decoded = decode_image(data, MAX_PIXELS)
    x = preset.serve(decoded)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:

        def served(path: Path):
            load = lambda: torch.jit.load(str(path)).eval()  # noqa: E731
            return optimize(load(), "onednn", load, preset.crop_size, torch.device("cpu"), [1])

        with_cam, without = served(export_dir / export_mod.MODEL_FILE), served(no_cam / export_mod.MODEL_FILE)
        module = torch.jit.load(str(export_dir / export_mod.MODEL_FILE))
        cam, _ = grad_cam(module, x, 0)
        box = crop_box(decoded.size, preset.resize_size, preset.crop_size)

        def forward(model):
            with torch.inference_mode():
                return model(x[None])

        ms = paired_medians_ms(
            {
                "forward": lambda: forward(with_cam),
                "forward_without_cam_methods": lambda: forward(without),
                "grad_cam": lambda: grad_cam(module, x, 0),
                "overlay": lambda: overlay_png(decoded, cam, box),
            },
            rounds,
        )
    finally:
        torch.set_num_threads(threads)
    return {"photo": photo.name, "size": list(decoded.size), **{k: round(v, 2) for k, v in ms.items()}}


ROW_ORDER = (*BACKGROUNDS, "person beside", "all")
INTRO = """
Written by `make bench-explain` (`bench/explain.py`). Each of the 56 real dog photos of
`../shared/photos/dogs/` is pasted, its long side half the canvas's, at five places (the centre
and the corners of the part the model sees) on plain grey, noise, and photos without a dog; and
beside a real photo of a person, on either side. Each canvas goes the served way (JPEG bytes, the
handler's decoder and preprocessing, its Grad-CAM) through `imagenet_dogs`. A hit: the map's peak
falls inside the pasted dog photo. Shown for the map of the answer's breed and for the map of the
dog's own breed (a request's `target`): a dog this small is often given another breed, and that
breed's evidence may lie elsewhere.
"""


def markdown(result: dict) -> str:
    """The page docs/explanations.md publishes: what was measured, and the tables."""
    m = result["machine"]
    lines = [
        "# Explanations: do the maps point at the dog?",
        "",
        *INTRO.strip().splitlines(),
        "",
        f"Measured {m['date']} on {m['cpu']} ({m['usable_cores']} usable cores), torch {m['torch']}.",
        "",
        "| canvas | cases | answer's map: peak on the dog | answer is the dog's breed "
        "| the breed's map: peak on the dog |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in ROW_ORDER:
        r = result["rates"].get(key)
        if r is None:
            continue
        n = r["cases"]
        lines.append(
            f"| {key} | {n} | {report.percent(r['hit'] / n)} | {report.percent(r['right_breed'] / n)} "
            f"| {report.percent(r['breed_hit'] / n)} |"
        )
    c = result["cost"]
    lines += [
        "",
        f"Cost per image on one thread, as a worker runs: median of {result['rounds']} rounds taken in turn "
        f"({c['photo']}, {c['size'][0]}x{c['size'][1]}). Absolute times hold for this machine only.",
        "",
        "| step | ms |",
        "|---|---:|",
        f"| the plain answer's forward pass (the served file, oneDNN Graph) | {c['forward']} |",
        "| the same, the file exported without the explanation's methods "
        f"| {c['forward_without_cam_methods']} |",
        f"| Grad-CAM (a forward and a backward pass, fp32) | {c['grad_cam']} |",
        f"| the PNG overlay | {c['overlay']} |",
        "",
        f"Forward pass with ÷ without the methods: "
        f"{c['forward'] / c['forward_without_cam_methods']:.2f}, in the same run.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--placements", type=int, default=len(PLACES), help="places per dog and background (1-5)")
    p.add_argument("--dogs", type=int, help="the first N dog photos only (default: all)")
    p.add_argument("--rounds", type=int, default=15, help="timed runs of each cost, taking turns")
    p.add_argument("--out", type=Path, default=Path("build/bench"))
    a = p.parse_args(argv)
    for folder in (SHARED_PHOTOS / "dogs", SHARED_PHOTOS / "people"):
        if not folder.is_dir():
            p.error(f"{folder} is missing: the check needs the real photos of ../shared/photos")
    work = a.out / "explain"
    export_dir = pretrained.write_export("imagenet_dogs", work)
    model, ckpt = export_mod.load_checkpoint(work / "imagenet_dogs_run" / "best.pt")
    no_cam = work / "no_cam"
    no_cam.mkdir(parents=True, exist_ok=True)
    methods.to_torchscript(model, ckpt["eval_preset"]["crop_size"], explain=False).save(
        str(no_cam / export_mod.MODEL_FILE)
    )
    preset = EvalPreset.from_dict(ckpt["eval_preset"])
    labels = json.loads((export_dir / export_mod.LABELS_FILE).read_text())
    module = torch.jit.load(str(export_dir / export_mod.MODEL_FILE))
    dogs = dog_photos()[: a.dogs]
    cases = canvases(preset, a.placements, dogs) + beside_people(preset, dogs)
    random.Random(0).shuffle(cases)
    rows = pointing(module, preset, labels, cases)
    result = {
        "machine": report.machine(),
        "rounds": a.rounds,
        "rates": rates(rows),
        "cost": cost(export_dir, no_cam, preset, SHARED_PHOTOS / "dog_labrador.jpg", a.rounds),
        "misses": [r for r in rows if not (r["hit"] and r["breed_hit"])],
    }
    text = markdown(result)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "explain.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / "explain.md").write_text(text)
    print(f"wrote {a.out / 'explain.json'} and {a.out / 'explain.md'}")
    return result


if __name__ == "__main__":
    main()
