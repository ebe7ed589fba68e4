"""The serving benchmark: TorchServe with the project's handler against the in-process
figure, TorchServe's built-in handler (same settings, and out of the box) and a
per-request Flask-style server, on generated photo-like JPEGs of two sizes; then the dog
app as deployed (bench/dog_app.py) on real photos.

    python -m bench.run                       # the full run (make bench)
    python -m bench.run --smoke --out /tmp/b  # the CI smoke version: harness only, not speed
    python -m bench.run --publish docs/performance-results.md   # also the docs' copy

Writes <out>/results.json and <out>/results.md (default build/bench/), with the date,
the machine and the command, and prints the markdown. bench/harness.py says how a cell
is measured. --device auto (the default) runs every contestant on the GPU where torch
sees one, --device cpu on the CPU on any machine.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import chart, dog_app, harness, preprocess, report
from bench import exports as ex
from bench.images import SIZES, make_images
from bench.load import Target
from bench.lone import lone_requests
from bench.report import label
from handlers.precision import RUN_PRECISIONS, native_bf16
from serving.server import ROOT, free_port
from training.export.torchscript import add_server_flags

ALL = [report.SERVED, report.BUILTIN, report.DEFAULT, report.FLASK]  # plus in-process, always


def builtin_unavailable() -> str | None:
    """Why TorchServe's built-in image_classifier handler cannot run here, if it cannot:
    it imports captum, which only requirements-bench.txt installs."""
    if importlib.util.find_spec("captum") is None:
        return "captum is not installed (pip install -r requirements-bench.txt)"
    return None


# -- contestants ------------------------------------------------------------------------
def start_server(a, name: str, archives: dict, images, workdir: Path) -> tuple[harness.BenchServer, dict]:
    """TorchServe with the project's archive of ``name`` loaded at start: (server, startup)."""
    ts = harness.BenchServer(
        workdir / "model_store",
        workdir / f"ts_{name}",
        {"load_models": archives["custom"], "number_of_gpu": str(a.gpus)},
        omp_threads=a.threads,
    )
    print(
        f"  starting TorchServe (OMP_NUM_THREADS={a.threads}, {archives['custom']} loaded at start)",
        flush=True,
    )
    return ts, harness.start(ts, name, next(iter(images.values()))[0], "custom")


def torchserve_contestants(
    a, name: str, archives: dict, images, ip_rates, workdir: Path, skip: dict, start_timer=None
) -> dict:
    """served and builtin on one server (the bench settings), builtin_default on another.
    ``start_timer()``: a SingleImageTimer for the served lone requests (see bench/lone.py)."""
    res = {"cells": {}, "server_settings": {}}
    builtin = report.BUILTIN in a.contestants and not skip.get(report.BUILTIN)
    if report.SERVED in a.contestants or builtin:
        ts, res["startup"] = start_server(a, name, archives, images, workdir)
        try:
            client = ts.client
            # Both handlers on this server, each with the same workers x threads and batching:
            # their cells alternate (run_cells). Idle workers cost memory only.
            targets = {}
            if report.SERVED in a.contestants:
                res["server_settings"][report.SERVED] = harness.server_settings(client, name)
                target = harness.inference_target(ts, name)
                harness.warm(a, target, images, "custom", a.batch_size * a.workers)
                targets[report.SERVED] = ("served", target, name)
            if builtin:
                bname = Path(archives["builtin"]).stem
                client.register(
                    archives["builtin"],
                    batch_size=a.batch_size,
                    max_batch_delay=a.max_batch_delay,
                    initial_workers=a.workers,
                )
                res["server_settings"][report.BUILTIN] = harness.server_settings(client, bname)
                btarget = harness.inference_target(ts, bname)
                harness.warm(a, btarget, images, "builtin", a.batch_size * a.workers)
                targets[report.BUILTIN] = ("built-in", btarget, bname)
            res["cells"].update(
                harness.run_cells(a, {k: v[:2] for k, v in targets.items()}, images, ip_rates, ts.cpu_seconds)
            )
            res["lone"] = {}
            for k, (_, t, model) in targets.items():
                # the served latency at concurrency 1 against in-process timings taken
                # between its requests: one worker's threads, the same images
                paired = k == report.SERVED and start_timer and a.lone_requests
                with start_timer() if paired else contextlib.nullcontext() as timer:
                    res["lone"][k] = lone_requests(client, t, model, images, a.lone_requests, timer)
        finally:
            ts.stop()
    if report.DEFAULT in a.contestants and not skip.get(report.DEFAULT):
        res["cells"].update(out_of_the_box(a, name, archives, images, ip_rates, workdir, res))
    return res


def out_of_the_box(a, name: str, archives: dict, images, ip_rates, workdir: Path, res: dict) -> dict:
    """The built-in handler with TorchServe's defaults: one worker per core (per GPU where it
    has GPUs), batch size 1, torch's own thread count."""
    workers = default_workers(a)
    ts = harness.BenchServer(
        workdir / "model_store",
        workdir / f"ts_default_{name}",
        {"load_models": "", "default_workers_per_model": str(workers), "number_of_gpu": str(a.gpus)},
        omp_threads=None,
        log_config=None,
    )
    print(
        f"  starting TorchServe with its defaults ({workers} workers, batch 1, no OMP_NUM_THREADS)",
        flush=True,
    )
    with ts as client:
        bname = Path(archives["builtin"]).stem
        client.register(archives["builtin"], initial_workers=workers)
        res["server_settings"][report.DEFAULT] = harness.server_settings(client, bname)
        target = harness.inference_target(ts, bname)
        harness.warm(a, target, images, "builtin", workers)
        return harness.run_cells(
            a, {report.DEFAULT: ("out-of-box", target)}, images, ip_rates, ts.cpu_seconds
        )


def default_workers(a) -> int:
    """TorchServe's own default number of workers: one per GPU, else one per core."""
    return a.gpus or os.cpu_count() or 1


def wait_for_flask(proc, port: int, log: Path) -> dict:
    """The Flask-style server's /info once it answers."""
    deadline = time.monotonic() + 120
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/info")
            info = json.loads(conn.getresponse().read())
            conn.close()
            return info
        except (OSError, ValueError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Flask-style server did not start: see {log}") from None
            time.sleep(0.2)


def flask_contestant(a, name: str, export: Path, images, ip_rates, workdir: Path) -> tuple[dict, dict]:
    port = free_port()
    log_path = workdir / f"flask_{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.flask_server",
                "--export",
                str(export),
                "--port",
                str(port),
                "--device",
                a.device,
            ],
            cwd=ROOT,
            env=harness.child_env(None),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        print(f"  starting the Flask-style server on 127.0.0.1:{port}", flush=True)
        try:
            info = wait_for_flask(proc, port, log_path)
            target = Target(f"http://127.0.0.1:{port}/predictions/{name}")
            harness.warm(a, target, images, "custom", 4)
            return harness.run_cells(a, {report.FLASK: ("flask", target)}, images, ip_rates)[
                report.FLASK
            ], info
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


SPEED_KEYS = ("threads", "jpeg_draft", "optimize", "half", "gpu_decode", "quantized_engine")


def contestant_settings(a, skip: dict, flask_info: dict | None, handler: dict) -> dict:
    on = f"{a.gpus} GPU(s)" if a.device == "cuda" else "CPU"
    same = (
        f"{a.workers} worker(s) x {a.threads} torch thread(s) (OMP_NUM_THREADS={a.threads}), "
        f"batch size {a.batch_size}, max batch delay {a.max_batch_delay} ms, on {on}"
    )
    speed = ", ".join(f"{k}={handler[k]}" for k in SPEED_KEYS if k in handler)
    c = {
        report.SERVED: {"settings": f"handlers/image_classifier.py ({speed}); {same}"},
        report.INPROCESS: {
            "settings": f"the same handler and model-config.yaml, no server: {a.workers} "
            f"process(es) x {a.threads} torch thread(s) side by side, as "
            f"the workers; on {a.device}; images/s summed, best of batch "
            f"sizes {a.inprocess_batch_sizes}"
        },
        report.BUILTIN: {"settings": f"TorchServe's image_classifier handler; {same}"},
        report.DEFAULT: {
            "settings": f"TorchServe's image_classifier handler with TorchServe's defaults: "
            f"{default_workers(a)} workers (one per "
            f"{'GPU' if a.gpus else 'core'}), batch size 1, no OMP_NUM_THREADS"
        },
        report.FLASK: {
            "settings": "Flask development server, threaded, one image per request "
            "(PIL decode + eval transform + forward, model as torch.jit.load "
            "gives it), torch threads "
            f"{flask_info['torch_threads'] if flask_info else 'default'}"
            f", no OMP_NUM_THREADS, on {a.device}"
        },
    }
    for k in c:
        if k != report.INPROCESS and k not in a.contestants:
            c[k]["skipped"] = "not selected (--contestants)"
        elif k in skip:
            c[k]["skipped"] = skip[k]
    return c


# -- the run ----------------------------------------------------------------------------
def run_model(
    a, source: str, image_files, images, work: Path, settings: dict, skip: dict, precision: str = "fp32"
) -> dict:
    """One model, in one precision, under the project's base handler against every contestant."""
    name = label(source, precision)
    print(f"\n== {name} ==", flush=True)
    export_args = [*shlex.split(a.export_args), "--precision", precision]
    meta = ex.prepare_export(source, a.exports, work, settings, export_args, served_name=name)
    export = Path(meta["export"])
    archives = ex.build_archives(name, export, work / "model_store")
    model = {**meta, "builtin_handler": archives["builtin_handler"]}
    ip = model["in_process"] = harness.in_process(a, export, image_files, work / f"inprocess_{name}.json")
    ip_rates = {s: v["best_images_per_s"] for s, v in ip["sizes"].items()}
    mskip = dict(skip)
    if ip["outputs"] > 1:
        why = "the model has an ImageNet head (2 outputs), which the built-in handler cannot answer"
        mskip.setdefault(report.BUILTIN, why)
        mskip.setdefault(report.DEFAULT, why)
    model["skipped"] = {k: v for k, v in mskip.items() if k not in skip}
    # imported here: bench.inprocess loads TorchServe's and the handler's modules, which
    # this process (the load generator) does not otherwise need
    from bench.inprocess import SingleImageTimer

    timer = lambda: SingleImageTimer(  # noqa: E731
        export, a.threads, image_files, harness.child_env(a.threads), ROOT, harness.inprocess_gpu(a)
    )
    model.update(torchserve_contestants(a, name, archives, images, ip_rates, work, mskip, timer))
    if report.FLASK in a.contestants:
        model["cells"][report.FLASK], model["flask_server"] = flask_contestant(
            a, name, export, images, ip_rates, work
        )
    tp = {
        k: {s: {c["concurrency"]: c["images_per_s"] for c in cells} for s, cells in v.items()}
        for k, v in model["cells"].items()
    }
    tp[report.INPROCESS] = ip_rates
    model["ratios"] = report.ratio_table(tp)
    return model


def builtin_skips(a) -> dict:
    """{contestant: why} for the built-in handler's contestants where they cannot run."""
    if report.BUILTIN not in a.contestants and report.DEFAULT not in a.contestants:
        return {}
    reason = builtin_unavailable()
    if not reason:
        return {}
    print(f"built-in handler contestants skipped: {reason}", flush=True)
    return {report.BUILTIN: reason, report.DEFAULT: reason}


def command(argv: list[str]) -> str:
    """The command line that ran this benchmark, as typed from the project's root."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(ROOT)
    return shlex.join([str(python), "-m", "bench.run", *argv])


def write(a, results: dict) -> None:
    """results.json, results.md and the chart in --out; with --publish, the same markdown
    there, its chart beside it."""
    out = a.out
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    chart.plot(results, out / report.CHART)
    md = report.markdown(results)
    (out / "results.md").write_text(md)
    print("\n" + md)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / report.CHART}")
    if a.publish:
        png = a.publish.with_suffix(".png")
        a.publish.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / report.CHART, png)
        a.publish.write_text(report.markdown(results, png.name))
        print(f"published {a.publish} and {png}")


def run(a) -> dict:
    t_start, cpu_start = time.perf_counter(), report.cpu_snapshot()
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.out / "work"
    (work / "model_store").mkdir(parents=True, exist_ok=True)
    settings = {
        "workers": a.workers,
        "threads": a.threads,
        "batch_size": a.batch_size,
        "max_batch_delay": a.max_batch_delay,
        "device": a.device,
    }
    skip = builtin_skips(a)
    print(
        f"images: {a.images_per_size} per size of {', '.join(a.sizes)} (generated once, cached in "
        f"{a.out / 'images'})",
        flush=True,
    )
    image_files = {size: make_images(a.out / "images", size, a.images_per_size) for size in a.sizes}
    images = {s: [f.read_bytes() for f in fs] for s, fs in image_files.items()}
    results = {
        "command": command(a.argv),
        "smoke": a.smoke,
        "machine": report.machine(),
        "environment": harness.malloc_env(),
        "settings": {
            **settings,
            "concurrency": a.concurrency,
            "sizes": a.sizes,
            "client_processes": a.client_processes,
            "requests": a.requests or "auto: max(2 x concurrency, 16, cell_seconds x in-process images/s)",
            "warmup_requests": "max(2, concurrency // 2) per cell",
            "warm_seconds": a.warm_seconds,
            "cell_seconds": a.cell_seconds,
            "max_cell_seconds": a.max_cell_seconds,
            "export_args": a.export_args,
            "dog_rounds": a.dog_rounds,
            "inprocess_batch_sizes": a.inprocess_batch_sizes,
            "images": {s: {"count": len(v), "bytes": [len(b) for b in v]} for s, v in images.items()},
        },
        "models": {
            label(name, p): run_model(a, name, image_files, images, work, settings, skip, p)
            for name in a.models
            for p in a.precisions
        },
    }
    for name in a.dog_apps if a.dog_app else ():
        for p in a.precisions:
            print(f"\n== the dog app {name} ({p}) ==", flush=True)
            key = report.dog_app_key(name, p)
            results[key] = dog_app.run(a, work / key, settings, p, name)
    first = next(iter(results["models"].values()))
    handler_cfg = first["model_config"]["handler"]
    results["contestants"] = contestant_settings(a, skip, first.get("flask_server"), handler_cfg)
    print("preprocessing alone, plain PIL vs the handler's path ...", flush=True)
    results["preprocessing"] = {
        size: preprocess.measure(images[size][0], handler_cfg, repeats=3 if a.smoke else 9)
        for size in a.sizes
    }
    results["machine"]["load_average_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["machine"]["cpu_steal"] = report.steal_share(cpu_start, report.cpu_snapshot())
    results["duration_s"] = round(time.perf_counter() - t_start, 1)
    write(a, results)
    return results


# --smoke: the CI version, harness only, not speed.
SMOKE = {
    "models": ["flying_objects"],
    "sizes": ["500x375"],
    "concurrency": [1, 8],
    "requests": 12,
    "cell_seconds": 2.0,
    "max_cell_seconds": 20.0,
    "inprocess_batch_sizes": [1, 4],
    "inprocess_seconds": 0.3,
    "inprocess_min_batches": 2,
    "images_per_size": 2,
    "dog_rounds": 1,
    "dog_apps": ["dog_breeds"],
    "precisions": ["fp32"],
    "warm_seconds": 0.0,
}


def cuda_devices() -> int:
    """The GPUs torch can use here (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def replace_defaults(p: argparse.ArgumentParser, a: argparse.Namespace, values: dict) -> None:
    """Set each option of ``values`` that the command line left at its default."""
    for name, value in values.items():
        if getattr(a, name) == p.get_default(name):
            setattr(a, name, value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Serving benchmark: TorchServe vs "
        "in-process, built-in handler and a Flask-style server; the dog app.",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=list(ex.MODELS),
        choices=list(ex.MODELS),
        help="models served by the base handler against every contestant",
    )
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="JPEG sizes")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32], help="concurrent clients")
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=RUN_PRECISIONS,
        help="each model (and the dog app) is measured in each: fp32, and the export's bf16 copy "
        "(default: both where the CPU has bf16 units, else fp32 alone: emulated bf16 is many "
        "times slower; the header names the CPU's flags)",
    )
    p.add_argument(
        "--contestants",
        nargs="+",
        default=ALL,
        choices=ALL,
        help="which to run besides the in-process figure (always run)",
    )
    p.add_argument(
        "--dog-app",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the dog app (handlers/dog_breeds.py) on real photos",
    )
    p.add_argument(
        "--dog-apps",
        nargs="+",
        default=list(report.DOG_APPS),
        choices=report.DOG_APPS,
        help="which of the demo's dog apps: dog_breeds (the trained breed model beside the "
        "EfficientNet-Lite0 dog detector), imagenet_dogs (EfficientNet-Lite0 alone)",
    )
    p.add_argument(
        "--dog-rounds",
        type=int,
        default=2,
        help="rounds of the dog app's served cell and in-process run taking turns",
    )
    add_server_flags(p, workers=None)
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help="measured requests per cell (default: --cell-seconds x in-process images/s)",
    )
    p.add_argument(
        "--cell-seconds",
        type=float,
        default=5.0,
        help="sets the default --requests: this many seconds at the in-process rate",
    )
    p.add_argument(
        "--warm-seconds",
        type=float,
        default=10.0,
        help="load at the top concurrency for this long per set of photos before a server's "
        "first cell, none of it measured: the JVM compiles TorchServe's hot paths during "
        "its first minute, and a long-running server has done so",
    )
    p.add_argument(
        "--max-cell-seconds",
        type=float,
        default=20.0,
        help="time budget of a cell: it stops issuing requests this long after its "
        "start, measured count reached or not (in-flight requests then finish)",
    )
    p.add_argument(
        "--lone-requests",
        type=int,
        default=20,
        help="requests sent one at a time per size after the cells, each compared with "
        "the worker's HandlerTime for it (served and built-in)",
    )
    p.add_argument(
        "--inprocess-batch-sizes",
        nargs="+",
        type=int,
        default=[1, 4, 8, 16],
        help="batch sizes the in-process figure tries (the best one counts)",
    )
    p.add_argument("--inprocess-seconds", type=float, default=3.0, help="time per in-process batch size")
    p.add_argument(
        "--inprocess-min-batches",
        type=int,
        default=3,
        help="at least this many timed batches per in-process batch size",
    )
    p.add_argument("--images-per-size", type=int, default=4, help="different JPEGs per size")
    p.add_argument(
        "--export-args",
        default="",
        help="more training.export options for the served model-config.yaml, e.g. "
        "'--jpeg-draft 0 --no-optimize' (default: the export's defaults)",
    )
    p.add_argument(
        "--exports",
        type=Path,
        default=ROOT / "export",
        help="trained exports (<dir>/<model>/model.pt); random weights where absent",
    )
    p.add_argument("--out", type=Path, default=ROOT / "build" / "bench", help="results and work files")
    p.add_argument(
        "--publish",
        type=Path,
        help="also write the markdown here (e.g. docs/performance-results.md), the "
        "chart beside it with the same name and .png",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where every contestant runs: auto is cuda where torch sees a GPU (TorchServe "
        "with number_of_gpu = all of them), else cpu (number_of_gpu=0)",
    )
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="processes the load generator spreads its clients over",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CI version: flying_objects, 500x375, concurrency 1 8, tiny counts, one dog "
        "app round (options given explicitly win)",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.workers = a.workers or max(1, (os.cpu_count() or 1) // a.threads)
    gpus = cuda_devices()
    if a.device == "auto":
        a.device = "cuda" if gpus else "cpu"
    elif a.device == "cuda" and not gpus:
        p.error("--device cuda: torch sees no CUDA device on this machine")
    a.gpus = gpus if a.device == "cuda" else 0
    if a.smoke:
        replace_defaults(p, a, SMOKE)
        a.lone_requests = min(a.lone_requests, 5)
    if a.precisions is None:
        native, why = native_bf16()
        a.precisions = ["fp32", "bf16"] if native else ["fp32"]
        print(f"precisions: {' and '.join(a.precisions)} ({why})", flush=True)
    a.out = a.out.resolve()
    a.exports = a.exports.resolve()
    a.publish = a.publish.resolve() if a.publish else None
    return a


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
