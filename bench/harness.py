"""What every measured app of the benchmark shares: the contestants' environment,
TorchServe started for it, the load cells, and the in-process run.

A cell is one contestant answering one set of photos at one concurrency c: c closed-loop
clients, a warm-up of max(2, c/2) answers, then a fixed number of measured answers
(--requests; by default max(2c, 16, --cell-seconds x the in-process images/s), so that a
contestant as fast as the in-process figure takes about --cell-seconds), within a time
budget per cell (--max-cell-seconds). The requests in flight at the end are waited for,
and their latencies counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.images import image_args
from bench.load import Target, one, run_load
from serving.server import MALLOC_ENV as SERVER_MALLOC_ENV
from serving.server import MALLOC_THRESHOLD, ROOT, LocalServer

# Raised glibc malloc thresholds (the Makefile exports the same): every contestant,
# in-process included, runs with them, so none of them is favoured by the allocator.
MALLOC_ENV = {k: MALLOC_THRESHOLD for k in SERVER_MALLOC_ENV}


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


def inference_target(ts: LocalServer, model: str) -> Target:
    """The load generator's target for ``model`` on ``ts``, with its inference key."""
    key = ts.client.keys().get("inference")
    return Target(
        f"http://127.0.0.1:{ts.ports['inference']}/predictions/{model}",
        {"Authorization": f"Bearer {key}"} if key else {},
    )


def server_settings(client, model: str) -> dict:
    """What the server reports for a registered model: the settings actually in force."""
    d = client.describe(model)[0]
    return {
        "batch_size": d.get("batchSize"),
        "max_batch_delay_ms": d.get("maxBatchDelay"),
        "workers": len(d.get("workers", [])),
    }


def first_answer(target: Target, image: bytes, t0: float, kind: str, wait_s: float = 120) -> float:
    """Seconds from ``t0`` to the first answer of ``kind``'s shape (a model loaded at start
    may answer 503 for a moment after READY)."""
    while True:
        status, body = one(target, image)
        if status == 200 or time.perf_counter() - t0 > wait_s:
            break
        time.sleep(0.05)
    check_answer(kind, status, body)
    return time.perf_counter() - t0


def start(ts: LocalServer, model: str, image: bytes, kind: str) -> dict:
    """Start ``ts``, whose config loads ``model`` at start, and time it: to READY, then to the
    first answer of ``kind``'s shape. A server that does not answer so is stopped."""
    t0 = time.perf_counter()
    ts.start()
    ready = time.perf_counter() - t0
    try:
        first = first_answer(inference_target(ts, model), image, t0, kind)
    except BaseException:
        ts.stop()
        raise
    print(f"  TorchServe start -> {model} READY {ready:.1f} s, first answer {first:.1f} s", flush=True)
    return {"start_to_ready_s": round(ready, 2), "start_to_first_answer_s": round(first, 2)}


# -- answers ----------------------------------------------------------------------------
# What each kind of contestant's answer holds: the project's handlers, TorchServe's built-in.
ANSWER_KEYS = {"custom": "top_k", "dog": "subject"}


def check_answer(kind: str, status: int, body: bytes) -> dict:
    """A contestant's answer, parsed; fails early, with the answer, unless it has its kind's shape."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    ok = (
        status == 200
        and isinstance(data, dict)
        and (
            all(isinstance(v, float) for v in data.values())
            if kind == "builtin"
            else ANSWER_KEYS[kind] in data
        )
    )
    if not ok:
        raise RuntimeError(f"unexpected {kind} answer: HTTP {status}: {body[:300]!r}")
    return data


def warm(a, target: Target, images: dict[str, list[bytes]], kind: str, burst: int) -> None:
    """Check the answer, then warm up: TorchScript optimises on its first calls, in every
    worker and for each batch shape, so a few requests one at a time and a short burst of
    ``burst`` concurrent ones per set of photos; then --warm-seconds of load at the top
    concurrency, for the server's own start-up work (the JVM's compiler). None of it is
    measured."""
    top = max(a.concurrency)
    for imgs in images.values():
        for i in range(2):
            status, body = one(target, imgs[i % len(imgs)])
            check_answer(kind, status, body)
        c = max(1, min(burst, top))
        load = dict(warmup_requests=0, processes=a.client_processes)
        run_load(target, imgs, c, c, max_seconds=a.max_cell_seconds, **load)
        if a.warm_seconds > 0:
            run_load(target, imgs, top, 10**9, max_seconds=a.warm_seconds, **load)


# -- cells ------------------------------------------------------------------------------
def requests_for(a, ip_rate: float | None, c: int) -> int:
    """Measured answers per cell: --requests, else what the in-process figure does in
    --cell-seconds, and at least two per client (so every client's latency counts)."""
    if a.requests:
        return a.requests
    return max(2 * c, 16, round(a.cell_seconds * (ip_rate or 10)))


def run_cell(
    a,
    label: str,
    target: Target,
    size: str,
    imgs: list[bytes],
    c: int,
    ip_rate: float | None,
    server_cpu=None,
) -> dict:
    """One set of photos x concurrency for one contestant: its summary, with the CPU steal
    and, given ``server_cpu()`` (LocalServer.cpu_seconds), the server's CPU per request."""
    n = requests_for(a, ip_rate, c)
    warmup = max(2, c // 2)
    print(f"  {label} {size} c={c}: {warmup} warm-up + {n} measured requests ...", end="", flush=True)
    cpu0 = report.cpu_snapshot()
    server0 = server_cpu() if server_cpu else None
    cell = report.summarize(
        run_load(
            target,
            imgs,
            c,
            n,
            warmup_requests=warmup,
            max_seconds=a.max_cell_seconds,
            processes=a.client_processes,
        )
    )
    cell["cpu_steal"] = report.steal_share(cpu0, report.cpu_snapshot())
    if server0 is not None:
        spent = report.per_request_ms(server0, server_cpu(), cell["total_requests"])
        cell["server_cpu_ms_per_request"] = spent
    lat = cell["latency_ms"]
    print(
        f" {cell['images_per_s']:.1f} img/s, p50 {lat['p50']:.0f} / p90 {lat['p90']:.0f} / "
        f"p99 {lat['p99']:.0f} ms, {cell['measured_requests']} measured, "
        f"errors {cell['errors']}, CPU steal {report.percent(cell['cpu_steal'])}"
        + (" (window closed by --max-cell-seconds)" if cell["window_closed_by"] == "time" else ""),
        flush=True,
    )
    return cell


def run_cells(
    a,
    contestants: dict[str, tuple[str, Target]],
    images: dict[str, list[bytes]],
    ip_rates: dict[str, float],
    server_cpu=None,
) -> dict:
    """Every size x concurrency, each cell run by every contestant one after the other
    ({key: (label, target)}; the order flips from cell to cell), so that contestants
    compared with each other are measured minutes apart at most, not a whole run apart:
    this machine's speed drifts. ``server_cpu``: the TorchServe they share, as run_cell
    takes it. Returns {key: {size: [cell summary, ...]}}."""
    out = {key: {} for key in contestants}
    cells = [(size, c) for size in images for c in a.concurrency]
    for (size, c), key in report.take_turns(contestants, cells):
        label, target = contestants[key]
        out[key].setdefault(size, []).append(
            run_cell(a, label, target, size, images[size], c, ip_rates.get(size), server_cpu)
        )
    return out


# -- in-process -------------------------------------------------------------------------
def inprocess_gpu(a) -> int | None:
    """The GPU the in-process handler gets, as a worker would (None: the CPU)."""
    return 0 if a.device == "cuda" else None


def inprocess_command(a, export: Path, image_files: dict[str, list[Path]], out: Path) -> list[str]:
    """One bench.inprocess process with a served worker's settings: its threads, its device."""
    cmd = [
        sys.executable,
        "-m",
        "bench.inprocess",
        "--export",
        str(export),
        "--threads",
        str(a.threads),
        "--seconds",
        str(a.inprocess_seconds),
        "--min-batches",
        str(a.inprocess_min_batches),
        "--out",
        str(out),
        "--batch-sizes",
        *map(str, a.inprocess_batch_sizes),
    ]
    if inprocess_gpu(a) is not None:
        cmd += ["--gpu", str(inprocess_gpu(a))]
    return cmd + image_args(image_files)


def side_by_side(a, export: Path, image_files: dict[str, list[Path]], out: Path) -> list[dict]:
    """--workers bench.inprocess processes, their timing started together once all are warm;
    the first also records answers and per-image checks. Their results, in order."""
    out.parent.mkdir(parents=True, exist_ok=True)
    go = out.with_suffix(".go")
    go.unlink(missing_ok=True)
    files = [out.with_suffix(f".{i}.json") for i in range(a.workers)]
    ready = [f.with_suffix(".ready") for f in files]
    procs = []
    for i, (f, r) in enumerate(zip(files, ready)):
        r.unlink(missing_ok=True)
        cmd = inprocess_command(a, export, image_files, f) + ["--ready-file", str(r), "--go-file", str(go)]
        procs.append(
            subprocess.Popen(cmd + (["--checks"] if i == 0 else []), cwd=ROOT, env=child_env(a.threads))
        )
    try:
        while not all(r.exists() for r in ready):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("bench.inprocess ended before its timing (its error is above)")
            time.sleep(0.05)
        go.touch()
        if any(p.wait() for p in procs):
            raise RuntimeError("bench.inprocess failed (its error is above)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads(f.read_text()) for f in files]


def in_process(a, export: Path, image_files: dict[str, list[Path]], out: Path) -> dict:
    """The handler of ``export`` on ``image_files`` ({name: files}) as the server's workers
    run it but without the server: one process per worker with its threads, side by side.
    Images/s by batch size (the processes' sum) per set of photos, the best of them, and
    what the first process recorded beside (answers, per-image checks)."""
    print(
        f"  in-process: {a.workers} process(es) x {a.threads} torch thread(s) side by side, batch "
        f"sizes {a.inprocess_batch_sizes}, on {a.device}, {', '.join(image_files)}",
        flush=True,
    )
    cpu0 = report.cpu_snapshot()
    raws = side_by_side(a, export, image_files, out)
    first = raws[0]
    sizes = {}
    for size, runs in first["sizes"].items():
        rates = [sum(raw["sizes"][size][i]["images_per_s"] for raw in raws) for i in range(len(runs))]
        best = max(range(len(runs)), key=lambda i: rates[i])
        single = next((r for r in runs if r["batch_size"] == 1), None)
        sizes[size] = {
            "images_per_s_by_batch": [round(r, 2) for r in rates],
            "best_images_per_s": round(rates[best], 2),
            "best_batch_size": runs[best]["batch_size"],
            "single_image_latency_ms": report.latency_ms(single["batch_times_s"]) if single else None,
            "batches_timed": [
                sum(raw["sizes"][size][i]["batches"] for raw in raws) for i in range(len(runs))
            ],
        }
    return {
        "processes": len(raws),
        "threads": first["threads"],
        "interop_threads": first["interop_threads"],
        "device": first["device"],
        "outputs": first["outputs"],
        "batch_sizes": a.inprocess_batch_sizes,
        "sizes": sizes,
        "answers": first.get("answers", {}),
        "checks_ms": first.get("checks_ms", {}),
        "cpu_steal": report.steal_share(cpu0, report.cpu_snapshot()),
    }
