"""The serving benchmark: TorchServe with the project's handler against the in-process
limit, TorchServe's built-in handler (same settings, and out of the box) and a
per-request Flask-style server, on generated photo-like JPEGs of two sizes.

    python -m bench.run                       # the full run (make bench)
    python -m bench.run --smoke --out /tmp/b  # the CI smoke version: harness only, not speed

Writes <out>/results.json and <out>/results.md (default build/bench/) and prints the
tables. Every cell (contestant x model x size x concurrency c) runs c closed-loop
clients (the project's and the built-in handler share one server and take turns, cell
by cell): a warm-up of max(2, c/2) answers, then a fixed number of measured answers
(--requests; by default max(2c, 16, --cell-seconds x the in-process images/s of that
model and size), so a cell of a contestant as fast as the in-process limit lasts about
--cell-seconds), within a time budget per cell (--max-cell-seconds): a slow contestant
is measured over what it answered until then. The requests in flight at the end are
waited for, and their latencies counted.

On a machine with CUDA (--device auto, the default, picks it) every contestant runs on
the GPU: TorchServe's workers (number_of_gpu), the in-process limit and the Flask-style
server; the defaults then suit a GPU (GPU_DEFAULTS: larger in-process batches, more
concurrent clients, spread over several client processes). --device cpu measures the
CPU on any machine.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import exports as ex
from bench import chart, preprocess, report
from bench.images import SIZES, image_args, make_images
from bench.load import Target, one, post, request_headers, run_load
from models.settings import HandlerSettings, ServerSettings
from serving.server import MALLOC_ENV as SERVER_MALLOC_ENV
from serving.server import MALLOC_THRESHOLD, ROOT, LocalServer, free_port

# Raised glibc malloc thresholds (the Makefile exports the same): every contestant,
# in-process included, runs with them, so none of them is favoured by the allocator.
MALLOC_ENV = {k: MALLOC_THRESHOLD for k in SERVER_MALLOC_ENV}
ALL = [report.SERVED, report.BUILTIN, report.DEFAULT, report.FLASK]  # plus in-process, always


def builtin_unavailable() -> str | None:
    """Why TorchServe's built-in image_classifier handler cannot run here, if it cannot:
    it imports captum, which only requirements-bench.txt installs."""
    if importlib.util.find_spec("captum") is None:
        return "captum is not installed (pip install -r requirements-bench.txt)"
    return None


def malloc_env() -> dict:
    return {k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}


def child_env(omp_threads: int | None) -> dict:
    """os.environ with the benchmark's malloc settings; OMP_NUM_THREADS set, or removed."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONPATH")}
    env.update(malloc_env())
    if omp_threads:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    return env


class BenchServer(LocalServer):
    """A LocalServer whose processes get the benchmark's environment."""

    def __init__(self, *args, omp_threads: int | None = None, **kw):
        super().__init__(*args, **kw)
        self.omp_threads = omp_threads

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in super().env.items() if k != "OMP_NUM_THREADS"}
        if self.omp_threads:
            env["OMP_NUM_THREADS"] = str(self.omp_threads)
        return env


# -- answers ----------------------------------------------------------------------------
def check_answer(kind: str, status: int, body: bytes) -> None:
    """Fail early, with the answer, unless a contestant's first answer has its expected shape."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    ok = status == 200 and isinstance(data, dict) and (
        all(isinstance(v, float) for v in data.values()) if kind == "builtin" else "top_k" in data)
    if not ok:
        raise RuntimeError(f"unexpected {kind} answer: HTTP {status}: {body[:300]!r}")


def warm(a, target: Target, images: dict[str, list[bytes]], kind: str, burst: int) -> None:
    """Check the answer, then warm up: TorchScript optimises on its first calls, in every
    worker and for each batch shape, so a few requests one at a time and a short burst of
    ``burst`` concurrent ones per size, none of them measured."""
    for imgs in images.values():
        for i in range(2):
            status, body = one(target, imgs[i % len(imgs)])
            check_answer(kind, status, body)
        c = max(1, min(burst, max(a.concurrency)))
        run_load(target, imgs, c, c, warmup_requests=0, max_seconds=a.max_cell_seconds,
                 processes=a.client_processes)


# -- cells ------------------------------------------------------------------------------
def requests_for(a, ip_rate: float | None, c: int) -> int:
    """Measured answers per cell: --requests, else what the in-process limit does in
    --cell-seconds, and at least two per client (so every client's latency counts)."""
    if a.requests:
        return a.requests
    return max(2 * c, 16, round(a.cell_seconds * (ip_rate or 10)))


def run_cell(a, label: str, target: Target, size: str, imgs: list[bytes], c: int,
             ip_rate: float | None) -> dict:
    """One size x concurrency for one contestant: its summary, with the CPU steal during it."""
    n = requests_for(a, ip_rate, c)
    warmup = max(2, c // 2)
    print(f"  {label} {size} c={c}: {warmup} warm-up + {n} measured requests ...", end="", flush=True)
    cpu0 = report.cpu_snapshot()
    cell = report.summarize(run_load(target, imgs, c, n, warmup_requests=warmup,
                                     max_seconds=a.max_cell_seconds, processes=a.client_processes))
    cell["cpu_steal"] = report.steal_share(cpu0, report.cpu_snapshot())
    lat = cell["latency_ms"]
    print(f" {cell['images_per_s']:.1f} img/s, p50 {lat['p50']:.0f} / p90 {lat['p90']:.0f} / "
          f"p99 {lat['p99']:.0f} ms, {cell['measured_requests']} measured, "
          f"errors {cell['errors']}, CPU steal {report.percent(cell['cpu_steal'])}"
          + (" (window closed by --max-cell-seconds)" if cell["window_closed_by"] == "time" else ""),
          flush=True)
    return cell


def run_cells(a, contestants: dict[str, tuple[str, Target]], images: dict[str, list[bytes]],
              ip_rates: dict[str, float]) -> dict:
    """Every size x concurrency, each cell run by every contestant one after the other
    ({key: (label, target)}; the order flips from cell to cell), so that contestants
    compared with each other are measured minutes apart at most, not a whole run apart:
    this machine's speed drifts. Returns {key: {size: [cell summary, ...]}}."""
    out = {key: {} for key in contestants}
    cells = [(size, c) for size in images for c in a.concurrency]
    for (size, c), key in report.take_turns(contestants, cells):
        label, target = contestants[key]
        out[key].setdefault(size, []).append(
            run_cell(a, label, target, size, images[size], c, ip_rates.get(size)))
    return out


def handler_time(client, model: str) -> float | None:
    """The HandlerTime gauge (ms) of ``model``'s last batch, from the metrics API."""
    for key, value in client.metrics().items():
        if key.startswith("HandlerTime{") and f'ModelName="{model}"' in key:
            return value
    return None


def new_handler_time(client, model: str, before: float | None, wait_s: float) -> float | None:
    """The HandlerTime gauge once it differs from ``before`` (the frontend takes it from the
    worker's log a moment after the answer); None if it has not within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        h = handler_time(client, model)
        if h is not None and h != before:
            return h
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)


def lone_requests(client, target: Target, model: str, images: dict[str, list[bytes]],
                  count: int, timer=None, wait_s: float = 1.0) -> dict:
    """One request at a time on a keep-alive connection, reading after each the worker's own
    HandlerTime for it: {size: {client, handler, outside: p50 ms, requests}}.

    Client latency minus the handler's time for the same request is what the server adds
    (batch delay, frontend, the hop to the worker and back). Unlike a comparison with an
    in-process timing taken minutes apart, it does not move with the machine's speed.
    A request whose HandlerTime reading never changes is left out.

    With ``timer`` (a bench.inprocess.SingleImageTimer), each request is paired with the
    same image timed in-process, before or after it in turn: {in_process: p50 ms,
    client_minus_in_process: the served latency at concurrency 1 over the in-process one,
    both of the same minutes}.
    """
    def p50(values: list[float]) -> float | None:
        return round(report.percentile(values, 50), 2) if values else None

    conn, path = target.connect()
    out = {}
    try:
        for size, imgs in images.items():
            rows, inproc = [], []
            for i in range(count):
                if timer and i % 2:
                    inproc.append(timer.ms(size, i))
                body = imgs[i % len(imgs)]
                before = handler_time(client, model)
                t0 = time.perf_counter()
                status, answer = post(conn, path, body, request_headers(target, body))
                ms = 1000 * (time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"lone request to {model}: HTTP {status}: {answer[:200]!r}")
                h = new_handler_time(client, model, before, wait_s)
                if h is not None:
                    rows.append((ms, h))
                if timer and not i % 2:
                    inproc.append(timer.ms(size, i))
            d = out[size] = {"client_ms": p50([c for c, _ in rows]), "handler_ms": p50([h for _, h in rows]),
                             "outside_ms": p50([c - h for c, h in rows]), "requests": len(rows)}
            line = (f"    lone requests {size}: client p50 {d['client_ms']} ms, in the handler "
                    f"{d['handler_ms']} ms, outside it {d['outside_ms']} ms ({len(rows)} of {count} read)")
            if inproc and d["client_ms"] is not None:
                d["in_process_ms"] = p50(inproc)
                d["client_minus_in_process_ms"] = round(d["client_ms"] - d["in_process_ms"], 2)
                line += f"; in-process between them {d['in_process_ms']} ms"
            print(line, flush=True)
    finally:
        conn.close()
    return out


def server_settings(client, model: str) -> dict:
    """What the server reports for a registered model: the settings actually in force."""
    d = client.describe(model)[0]
    return {"batch_size": d.get("batchSize"), "max_batch_delay_ms": d.get("maxBatchDelay"),
            "workers": len(d.get("workers", []))}


def inference_target(ts: LocalServer, model: str) -> Target:
    """The load generator's target for ``model`` on ``ts``, with its inference key."""
    key = ts.client.keys().get("inference")
    return Target(f"http://127.0.0.1:{ts.ports['inference']}/predictions/{model}",
                  {"Authorization": f"Bearer {key}"} if key else {})


# -- contestants ------------------------------------------------------------------------
def inprocess_threads(a) -> int:
    """The in-process limit's torch threads: all the server's workers' threads, in one process."""
    return a.workers * a.threads


def inprocess_gpu(a) -> int | None:
    """The GPU the in-process handler gets, as a worker would (None: the CPU)."""
    return 0 if a.device == "cuda" else None


def inprocess_command(a, export: Path, image_files: dict[str, list[Path]], out: Path) -> list[str]:
    """bench.inprocess with the served settings: the server's threads in one process, on
    the device the workers get."""
    cmd = [sys.executable, "-m", "bench.inprocess", "--export", str(export),
           "--threads", str(inprocess_threads(a)), "--seconds", str(a.inprocess_seconds),
           "--min-batches", str(a.inprocess_min_batches), "--out", str(out),
           "--batch-sizes", *map(str, a.inprocess_batch_sizes), "--request-threads", str(a.threads)]
    if inprocess_gpu(a) is not None:
        cmd += ["--gpu", str(inprocess_gpu(a))]
    return cmd + image_args(image_files)


def in_process(a, name: str, export: Path, image_files: dict[str, list[Path]], workdir: Path) -> dict:
    threads = inprocess_threads(a)
    out = workdir / f"inprocess_{name}.json"
    cmd = inprocess_command(a, export, image_files, out)
    print(f"  in-process limit: {threads} torch threads, batch sizes {a.inprocess_batch_sizes}, "
          f"on {a.device}", flush=True)
    cpu0 = report.cpu_snapshot()
    subprocess.run(cmd, check=True, cwd=ROOT, env=child_env(threads))
    steal = report.steal_share(cpu0, report.cpu_snapshot())
    raw = json.loads(out.read_text())
    sizes = {}
    for size, runs in raw["sizes"].items():
        best = max(runs, key=lambda r: r["images_per_s"])
        single = next((r for r in runs if r["batch_size"] == 1), None)
        per_request = (raw.get("single_per_request_threads", {}).get(size)
                       or (single["batch_times_s"] if single else None))
        sizes[size] = {
            "images_per_s_by_batch": [round(r["images_per_s"], 2) for r in runs],
            "best_images_per_s": round(best["images_per_s"], 2), "best_batch_size": best["batch_size"],
            "single_image_latency_ms": report.latency_ms(single["batch_times_s"]) if single else None,
            # What one request gets in a worker: --threads (with workers > 1, not all the cores).
            "single_image_request_threads_ms": report.latency_ms(per_request) if per_request else None,
            "batches_timed": [r["batches"] for r in runs]}
    return {"threads": raw["threads"], "interop_threads": raw["interop_threads"], "device": raw["device"],
            "request_threads": raw.get("request_threads", raw["threads"]),
            "outputs": raw["outputs"], "batch_sizes": a.inprocess_batch_sizes, "sizes": sizes,
            "cpu_steal": steal}


def torchserve_contestants(a, name: str, archives: dict, images, ip_rates, workdir: Path,
                           skip: dict, start_timer=None) -> dict:
    """served and builtin on one server (the bench settings), builtin_default on another.
    ``start_timer()``: a SingleImageTimer for the served lone requests (see lone_requests)."""
    res = {"cells": {}, "server_settings": {}}
    builtin = report.BUILTIN in a.contestants and not skip.get(report.BUILTIN)
    if report.SERVED in a.contestants or builtin:
        ts = BenchServer(workdir / "model_store", workdir / f"ts_{name}",
                         {"load_models": archives["custom"], "number_of_gpu": str(a.gpus)},
                         omp_threads=a.threads)
        print(f"  starting TorchServe (OMP_NUM_THREADS={a.threads}, {archives['custom']} loaded at start)",
              flush=True)
        t0 = time.perf_counter()
        with ts as client:
            t_ready = time.perf_counter() - t0
            target = inference_target(ts, name)
            first = next(iter(images.values()))[0]
            while True:  # start -> first successful prediction
                status, body = one(target, first)
                if status == 200 or time.perf_counter() - t0 > 120:
                    break
                time.sleep(0.05)
            check_answer("custom", status, body)
            res["startup"] = {"start_to_ready_s": round(t_ready, 2),
                              "start_to_first_answer_s": round(time.perf_counter() - t0, 2),
                              "note": "torchserve --start to workers READY (polled every 0.5 s), "
                                      "then to the first 200 answer; model loaded by load_models"}
            print(f"  TorchServe start -> {name} READY {t_ready:.1f} s, first answer "
                  f"{res['startup']['start_to_first_answer_s']:.1f} s", flush=True)
            # Both handlers on this server, each with the same workers x threads and batching:
            # their cells alternate (run_cells). Idle workers cost memory only.
            targets = {}
            if report.SERVED in a.contestants:
                res["server_settings"][report.SERVED] = server_settings(client, name)
                warm(a, target, images, "custom", a.batch_size * a.workers)
                targets[report.SERVED] = ("served", target, name)
            if builtin:
                bname = Path(archives["builtin"]).stem
                client.register(archives["builtin"], batch_size=a.batch_size,
                                max_batch_delay=a.max_batch_delay, initial_workers=a.workers)
                res["server_settings"][report.BUILTIN] = server_settings(client, bname)
                btarget = inference_target(ts, bname)
                warm(a, btarget, images, "builtin", a.batch_size * a.workers)
                targets[report.BUILTIN] = ("built-in", btarget, bname)
            res["cells"].update(run_cells(a, {k: v[:2] for k, v in targets.items()}, images, ip_rates))
            res["lone"] = {}
            for k, (_, t, model) in targets.items():
                # the served latency at concurrency 1 against in-process timings taken
                # between its requests: one worker's threads, the same images
                paired = k == report.SERVED and start_timer and a.lone_requests
                with start_timer() if paired else contextlib.nullcontext() as timer:
                    res["lone"][k] = lone_requests(client, t, model, images, a.lone_requests, timer)
    if report.DEFAULT in a.contestants and not skip.get(report.DEFAULT):
        # TorchServe's defaults: one worker per core (per GPU where it has GPUs), batch
        # size 1, torch's own thread count.
        workers = default_workers(a)
        ts = BenchServer(workdir / "model_store", workdir / f"ts_default_{name}",
                         {"load_models": "", "default_workers_per_model": str(workers),
                          "number_of_gpu": str(a.gpus)}, omp_threads=None, log_config=None)
        print(f"  starting TorchServe with its defaults ({workers} workers, batch 1, no OMP_NUM_THREADS)",
              flush=True)
        with ts as client:
            bname = Path(archives["builtin"]).stem
            client.register(archives["builtin"], initial_workers=workers)
            res["server_settings"][report.DEFAULT] = server_settings(client, bname)
            target = inference_target(ts, bname)
            warm(a, target, images, "builtin", workers)
            res["cells"].update(run_cells(a, {report.DEFAULT: ("out-of-box", target)}, images, ip_rates))
    return res


def default_workers(a) -> int:
    """TorchServe's own default number of workers: one per GPU, else one per core."""
    return a.gpus or os.cpu_count() or 1


def flask_contestant(a, name: str, export: Path, images, ip_rates, workdir: Path) -> tuple[dict, dict]:
    port = free_port()
    log = open(workdir / f"flask_{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bench.flask_server", "--export", str(export),
                             "--port", str(port), "--device", a.device], cwd=ROOT, env=child_env(None),
                            stdout=log, stderr=subprocess.STDOUT)
    print(f"  starting the Flask-style server on 127.0.0.1:{port}", flush=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/info")
                info = json.loads(conn.getresponse().read())
                conn.close()
                break
            except (OSError, ValueError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Flask-style server did not start: see {log.name}")
                time.sleep(0.2)
        target = Target(f"http://127.0.0.1:{port}/predictions/{name}")
        warm(a, target, images, "custom", 4)
        return run_cells(a, {report.FLASK: ("flask", target)}, images, ip_rates)[report.FLASK], info
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


# -- the run ----------------------------------------------------------------------------
SPEED_KEYS = ("threads", "jpeg_draft", "optimize", "half", "gpu_decode", "quantized_engine")


def contestant_settings(a, skip: dict, flask_info: dict | None, handler: dict) -> dict:
    on = f"{a.gpus} GPU(s)" if a.device == "cuda" else "CPU"
    same = (f"{a.workers} worker(s) x {a.threads} torch thread(s) (OMP_NUM_THREADS={a.threads}), "
            f"batch size {a.batch_size}, max batch delay {a.max_batch_delay} ms, on {on}")
    speed = ", ".join(f"{k}={handler[k]}" for k in SPEED_KEYS if k in handler)
    c = {report.SERVED: {"settings": f"handlers/image_classifier.py ({speed}); {same}"},
         report.INPROCESS: {"settings": f"the same handler and model-config.yaml in one process, "
                                         f"{inprocess_threads(a)} torch thread(s), no server, "
                                         f"on {a.device}; best of batch sizes {a.inprocess_batch_sizes}"},
         report.BUILTIN: {"settings": f"TorchServe's image_classifier handler; {same}"},
         report.DEFAULT: {"settings": f"TorchServe's image_classifier handler with TorchServe's defaults: "
                                      f"{default_workers(a)} workers (one per "
                                      f"{'GPU' if a.gpus else 'core'}), batch size 1, no OMP_NUM_THREADS"},
         report.FLASK: {"settings": "Flask development server, threaded, one image per request "
                                    "(PIL decode + eval transform + forward, model as torch.jit.load "
                                    "gives it), torch threads "
                                    f"{flask_info['torch_threads'] if flask_info else 'default'}"
                                    f", no OMP_NUM_THREADS, on {a.device}"}}
    for k in c:
        if k != report.INPROCESS and k not in a.contestants:
            c[k]["skipped"] = "not selected (--contestants)"
        elif k in skip:
            c[k]["skipped"] = skip[k]
    return c


def targets(results: dict, top_c: int) -> list[dict]:
    out = []
    for name, m in results["models"].items():
        for r in m["ratios"]:
            if r["concurrency"] != top_c:
                continue
            if r["served/in-process"] is not None:
                out.append({"what": f"{name} {r['size']} c={top_c}: served/in-process >= 0.85",
                            "value": r["served/in-process"], "met": r["served/in-process"] >= 0.85})
            if r["served/built-in"] is not None:
                goal = 3.0 if r["size"] == "4000x3000" else 1.5
                out.append({"what": f"{name} {r['size']} c={top_c}: served/built-in >= {goal:g}",
                            "value": r["served/built-in"], "met": r["served/built-in"] >= goal})
        lone = m.get("lone", {}).get(report.SERVED) or {}
        for size, d in (m.get("latency_check") or {}).items():
            paired = lone.get(size, {}).get("client_minus_in_process_ms")
            if paired is not None:  # timed in the same minutes: preferred
                out.append({"what": f"{name} {size}: p50 at c=1 (lone requests) within 10 ms of "
                                    "in-process single images timed between them",
                            "value": f"{paired:+.1f} ms", "met": paired <= 10})
            else:
                out.append({"what": f"{name} {size}: p50 at c=1 within 10 ms of in-process",
                            "value": f"{d['difference_ms']:+.1f} ms", "met": d["difference_ms"] <= 10})
        for size, d in lone.items():
            if d["outside_ms"] is not None:
                out.append({"what": f"{name} {size}: a lone request's time outside the handler "
                                    f"(client p50 - HandlerTime p50 of the same requests) <= 10 ms",
                            "value": f"{d['outside_ms']:.1f} ms", "met": d["outside_ms"] <= 10})
    for size, p in (results.get("preprocessing") or {}).items():
        if size == "4000x3000":
            out.append({"what": f"{size} preprocessing: handler / plain PIL <= 0.25",
                        "value": p["ratio"], "met": p["ratio"] <= 0.25})
    return out


def print_tables(results: dict) -> None:
    print("\n" + report.markdown(results))


def run(a) -> dict:
    t_start, cpu_start = time.perf_counter(), report.cpu_snapshot()
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    (work / "model_store").mkdir(parents=True, exist_ok=True)
    settings = {"workers": a.workers, "threads": a.threads, "batch_size": a.batch_size,
                "max_batch_delay": a.max_batch_delay, "device": a.device}
    skip = {}
    if report.BUILTIN in a.contestants or report.DEFAULT in a.contestants:
        reason = builtin_unavailable()
        if reason:
            skip = {report.BUILTIN: reason, report.DEFAULT: reason}
            print(f"built-in handler contestants skipped: {reason}", flush=True)
    print(f"images: {a.images_per_size} per size of {', '.join(a.sizes)} (generated once, cached in "
          f"{out / 'images'})", flush=True)
    image_files = {size: make_images(out / "images", size, a.images_per_size) for size in a.sizes}
    images = {s: [f.read_bytes() for f in fs] for s, fs in image_files.items()}
    results = {"command": "python -m bench.run " + shlex.join(a.argv), "smoke": a.smoke,
               "machine": report.machine(), "environment": malloc_env(),
               "settings": {**settings, "concurrency": a.concurrency, "sizes": a.sizes,
                            "client_processes": a.client_processes,
                            "requests": a.requests or "auto: max(2 x concurrency, 16, "
                                        "cell_seconds x in-process images/s)",
                            "warmup_requests": "max(2, concurrency // 2) per cell",
                            "cell_seconds": a.cell_seconds, "max_cell_seconds": a.max_cell_seconds,
                            "export_args": a.export_args,
                            "inprocess_batch_sizes": a.inprocess_batch_sizes,
                            "images": {s: {"count": len(v), "bytes": [len(b) for b in v]}
                                       for s, v in images.items()}},
               "models": {}}
    flask_info = None
    for name in a.models:
        print(f"\n== {name} ==", flush=True)
        meta = ex.prepare_export(name, a.exports, work, settings, shlex.split(a.export_args))
        export = Path(meta["export"])
        archives = ex.build_archives(name, export, work / "model_store")
        model = {**meta, "builtin_handler": archives["builtin_handler"]}
        ip = in_process(a, name, export, image_files, work)
        model["in_process"] = ip
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
            export, a.threads, image_files, child_env(a.threads), ROOT, inprocess_gpu(a))
        model.update(torchserve_contestants(a, name, archives, images, ip_rates, work, mskip, timer))
        if report.FLASK in a.contestants:
            model["cells"][report.FLASK], flask_info = flask_contestant(a, name, export, images,
                                                                        ip_rates, work)
        tp = {k: {s: {c["concurrency"]: c["images_per_s"] for c in cells} for s, cells in v.items()}
              for k, v in model["cells"].items()}
        tp[report.INPROCESS] = ip_rates
        model["ratios"] = report.ratio_table(tp)
        if report.SERVED in model["cells"]:
            model["latency_check"] = {}
            for size, cells in model["cells"][report.SERVED].items():
                c1 = next((c for c in cells if c["concurrency"] == 1), None)
                # One request runs on one worker's threads: compare with one image on as many.
                single = ip["sizes"][size]["single_image_request_threads_ms"]
                every = ip["sizes"][size]["single_image_latency_ms"]
                if c1 and single:
                    model["latency_check"][size] = {
                        "served_p50_ms": c1["latency_ms"]["p50"], "in_process_ms": single["p50"],
                        "in_process_threads": ip["request_threads"],
                        "in_process_all_threads_ms": every["p50"] if every else None,
                        "difference_ms": round(c1["latency_ms"]["p50"] - single["p50"], 2)}
        results["models"][name] = model
    first = next(iter(results["models"].values()), {})
    handler_cfg = first.get("model_config", {}).get("handler", {})
    results["contestants"] = contestant_settings(a, skip, flask_info, handler_cfg)
    if handler_cfg:
        print("preprocessing alone, plain PIL vs the handler's path ...", flush=True)
        results["preprocessing"] = {size: preprocess.measure(images[size][0], handler_cfg,
                                                             repeats=3 if a.smoke else 9)
                                    for size in a.sizes}
    results["machine"]["load_average_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["machine"]["cpu_steal"] = report.steal_share(cpu_start, report.cpu_snapshot())
    results["duration_s"] = round(time.perf_counter() - t_start, 1)
    results["targets"] = targets(results, max(a.concurrency))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    chart.plot(results, out / report.CHART)
    print_tables(results)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / report.CHART}")
    return results


# --smoke: the CI version, harness only, not speed.
SMOKE = {"models": ["flying_objects"], "sizes": ["500x375"], "concurrency": [1, 8], "requests": 12,
         "cell_seconds": 2.0, "max_cell_seconds": 20.0, "inprocess_batch_sizes": [1, 4],
         "inprocess_seconds": 0.3, "inprocess_min_batches": 2, "images_per_size": 2}
# --device cuda: a GPU answers thousands of images/s. Its batches are larger, it needs more
# requests in flight to fill them, and more than one Python process to send them. Starting
# points, not measured here: no GPU machine was lent to this project's benchmark.
GPU_DEFAULTS = {"concurrency": [1, 32, 256], "inprocess_batch_sizes": [1, 8, 32, 128]}


def cuda_devices() -> int:
    """The GPUs torch can use here (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def replace_defaults(p: argparse.ArgumentParser, a: argparse.Namespace, values: dict) -> None:
    """Set each option of ``values`` that the command line left at its default."""
    for name, value in values.items():
        if getattr(a, name) == p.get_default(name):
            setattr(a, name, value)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description="Serving benchmark: TorchServe vs in-process, built-in "
                                "handler and a Flask-style server.")
    p.add_argument("--models", nargs="+", default=list(ex.MODELS), choices=list(ex.MODELS),
                   help="served model names")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="JPEG sizes")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32], help="concurrent clients")
    p.add_argument("--contestants", nargs="+", default=ALL, choices=ALL,
                   help="which to run besides the in-process limit (always run)")
    p.add_argument("--workers", type=int, default=None,
                   help="TorchServe workers per model (default: cores / --threads)")
    p.add_argument("--threads", type=int, default=HandlerSettings.threads,
                   help="torch threads per worker: OMP_NUM_THREADS and model-config.yaml's threads")
    p.add_argument("--batch-size", type=int, default=ServerSettings.batch_size,
                   help="TorchServe batch size")
    # TorchServe waits up to this long for a batch to fill even when one request is all
    # there is: it adds to every latency at concurrency 1 (target: within 10 ms of in-process).
    p.add_argument("--max-batch-delay", type=int, default=ServerSettings.max_batch_delay,
                   help="TorchServe max batch delay (ms)")
    p.add_argument("--requests", type=int, default=None,
                   help="measured requests per cell (default: --cell-seconds x in-process images/s)")
    p.add_argument("--cell-seconds", type=float, default=5.0,
                   help="sets the default --requests: this many seconds at the in-process rate")
    p.add_argument("--max-cell-seconds", type=float, default=20.0,
                   help="time budget of a cell: it stops issuing requests this long after its "
                        "start, measured count reached or not (in-flight requests then finish)")
    p.add_argument("--lone-requests", type=int, default=20,
                   help="requests sent one at a time per size after the cells, each compared with "
                        "the worker's HandlerTime for it (served and built-in)")
    p.add_argument("--inprocess-batch-sizes", nargs="+", type=int, default=[1, 4, 8, 16],
                   help="batch sizes the in-process limit tries (the best one counts)")
    p.add_argument("--inprocess-seconds", type=float, default=3.0, help="time per in-process batch size")
    p.add_argument("--inprocess-min-batches", type=int, default=3,
                   help="at least this many timed batches per in-process batch size")
    p.add_argument("--images-per-size", type=int, default=4, help="different JPEGs per size")
    p.add_argument("--export-args", default="",
                   help="more training.export options for the served model-config.yaml, e.g. "
                        "'--jpeg-draft 0 --no-optimize' (default: the export's defaults)")
    p.add_argument("--exports", type=Path, default=ROOT / "export",
                   help="trained exports (<dir>/<model>/model.pt); random weights where absent")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "bench", help="results and work files")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where every contestant runs: auto is cuda where torch sees a GPU (TorchServe "
                        "with number_of_gpu = all of them), else cpu (number_of_gpu=0)")
    p.add_argument("--client-processes", type=int, default=None,
                   help="processes the load generator spreads its clients over (default: 1 on cpu, "
                        "cores / 4 on cuda)")
    p.add_argument("--smoke", action="store_true",
                   help="CI version: flying_objects, 500x375, concurrency 1 8, tiny counts "
                        "(options given explicitly win)")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.workers = a.workers or max(1, (os.cpu_count() or 1) // a.threads)
    gpus = cuda_devices()
    if a.device == "auto":
        a.device = "cuda" if gpus else "cpu"
    elif a.device == "cuda" and not gpus:
        p.error("--device cuda: torch sees no CUDA device on this machine")
    a.gpus = gpus if a.device == "cuda" else 0
    # Smoke values, then a GPU's: each replaces defaults only, not options given on the
    # command line (nor, for the GPU's, the smoke run's tiny counts).
    if a.smoke:
        replace_defaults(p, a, SMOKE)
        a.lone_requests = min(a.lone_requests, 5)
    if a.device == "cuda":
        replace_defaults(p, a, GPU_DEFAULTS)
    if a.client_processes is None:
        a.client_processes = max(1, (os.cpu_count() or 1) // 4) if a.device == "cuda" else 1
    a.out = a.out.resolve()
    a.exports = a.exports.resolve()
    return a


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
