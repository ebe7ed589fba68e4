"""The dog-breed app as deployed, in the benchmark: handlers/dog_breeds.py with its dog
detector, served by TorchServe with the settings under test, on real photos. Either of the
demo's two dog apps: dog_breeds (the trained breed model beside the EfficientNet-Lite0 dog
detector) or imagenet_dogs (EfficientNet-Lite0 alone, detector and breeds in one network).

Two sets of photos (training/demo/photos.py): the dog photo, which the handler answers from
the model alone, and photos with no dog (two portraits and a cup), for which it also
searches its small grey copy for a face. For each set, the served cell at the benchmark's
highest concurrency and the in-process figure for the same export (bench.inprocess: the
handler's decode, preprocessing, forward and face check in one process, at its best batch
size) take turns, --dog-rounds times, the order flipping each round; each side's figure
is the median of its rounds. The face check's own time per photo (the grey copy and the
search, as the handler runs them) comes from the in-process runs.

The dog app is held to: served >= 0.85 of the in-process figure for dog photos, and a face
check costing <= 10 ms per photo for the rest. The report gives the ratio and the time.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from bench import exports as ex
from bench import harness, report
from bench.load import one
from serving.archive import build_archive
from training.demo.photos import photos

# What each set of photos is, by the names training/demo/photos.py gives them.
GROUPS = {"dog photos": ("dog_labrador",), "non-dog photos": ("astronaut", "grace_hopper", "coffee")}
SERVED, IN_PROCESS = "served", "in_process"


def photo_sets(found: dict[str, Path]) -> tuple[dict[str, dict[str, Path]], dict[str, str]]:
    """({set: {photo name: path}}, {set: why it is missing}) from the photos found."""
    sets, missing = {}, {}
    for group, names in GROUPS.items():
        present = {n: found[n] for n in names if n in found}
        if present:
            sets[group] = present
        else:
            missing[group] = f"none of {', '.join(names)} among the photos (training/demo/photos.py)"
    return sets, missing


def subject(target, data: bytes) -> str:
    status, body = one(target, data)
    return harness.check_answer("dog", status, body)["subject"]


def start(a, name: str, work: Path, images: dict[str, list[bytes]]):
    """TorchServe with the dog app's archive loaded at start: (server, startup facts)."""
    ts = harness.BenchServer(
        work / "model_store",
        work / "ts",
        {"load_models": f"{name}.mar", "number_of_gpu": str(a.gpus)},
        omp_threads=a.threads,
    )
    print(f"  starting TorchServe with the dog app {name} (OMP_NUM_THREADS={a.threads})", flush=True)
    return ts, harness.start(ts, name, next(iter(images.values()))[0], "dog")


def take_turns(
    a, target, export: Path, files: dict[str, list[Path]], images: dict[str, list[bytes]], work: Path
) -> dict:
    """Each set's served cells and in-process runs, taking turns: {set: {cells, in_process,
    order (the sides in the order they ran)}}."""
    c = max(a.concurrency)
    out = {g: {"cells": [], "in_process": [], "order": []} for g in images}
    rounds = [(g, r) for g in images for r in range(a.dog_rounds)]
    for (g, r), side in report.take_turns([SERVED, IN_PROCESS], rounds):
        runs = out[g]
        runs["order"].append(side)
        if side == SERVED:
            rate = runs["in_process"][-1]["sizes"][g]["best_images_per_s"] if runs["in_process"] else None
            runs["cells"].append(harness.run_cell(a, "dog app", target, g, images[g], c, rate))
        else:
            runs["in_process"].append(
                harness.in_process(
                    a, export, {g: files[g]}, work / f"inprocess_{g.replace(' ', '_')}_{r}.json"
                )
            )
    return out


def summary(group: str, names: list[str], runs: dict, served_answers: list[str]) -> dict:
    """A set's figures: the medians of its rounds, the face check per photo, the answers."""
    served = report.median(x["images_per_s"] for x in runs["cells"])
    ip = report.median(r["sizes"][group]["best_images_per_s"] for r in runs["in_process"])
    checks = {
        n: round(report.median(r["checks_ms"][group][i] for r in runs["in_process"]), 2)
        for i, n in enumerate(names)
    }
    first = runs["in_process"][0]["answers"][group]
    return {
        "photos": names,
        "served_images_per_s": served,
        "in_process_images_per_s": ip,
        "served/in-process": report.ratio(served, ip),
        "face_check_ms": checks,
        "face_check_ms_mean": round(sum(checks.values()) / len(checks), 2),
        "answers": {
            n: {"served": s, "in_process": a["subject"]} for n, s, a in zip(names, served_answers, first)
        },
        "served_first": [side == SERVED for side in runs["order"][::2]],
        **runs,
    }


def run(a, work: Path, settings: dict, precision: str = "fp32", name: str = "dog_breeds") -> dict:
    """The part of the results of the dog app ``name`` (dog_breeds or imagenet_dogs), in
    ``precision``."""
    sets, missing = photo_sets(photos())
    export_args = [*shlex.split(a.export_args), "--precision", precision]
    meta = ex.prepare_export(name, a.exports, work, settings, export_args, "dog_breeds")
    out = {
        "name": name,
        "precision": precision,
        "origin": meta["origin"],
        "export": meta["export"],
        "model_config": meta["model_config"],
        "concurrency": max(a.concurrency),
        "photos": {g: {n: str(p) for n, p in ps.items()} for g, ps in sets.items()},
        "missing": missing,
        "groups": {},
    }
    if not sets:
        return out
    export = Path(meta["export"])
    build_archive(export, name, work / "model_store")
    files = {g: list(ps.values()) for g, ps in sets.items()}
    images = {g: [p.read_bytes() for p in fs] for g, fs in files.items()}
    ts, out["startup"] = start(a, name, work, images)
    try:
        target = harness.inference_target(ts, name)
        out["server_settings"] = harness.server_settings(ts.client, name)
        harness.warm(a, target, images, "dog", a.batch_size * a.workers)
        answers = {g: [subject(target, data) for data in imgs] for g, imgs in images.items()}
        runs = take_turns(a, target, export, files, images, work)
    finally:
        ts.stop()
    out["groups"] = {g: summary(g, list(sets[g]), runs[g], answers[g]) for g in sets}
    return out
