"""Drive a served model with concurrent clients for a while and report what happened.

    python -m serving.soak --model flying_objects --seconds 60 --concurrency 32
    python -m serving.soak --model flying_objects --seconds 20 --kill-worker-after 5

Loopback only, bounded in time and in count. Reports requests per status, the
server's message for each failed request, requests lost (5xx or no answer), latency
percentiles, and the resident memory of the model's worker after the warm-up and at
the end (goal: errors 0, growth under 10%).
With --kill-worker-after, the worker is killed (SIGKILL) mid-run to show what
in-flight requests get and that TorchServe replaces the worker.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import requests

from serving.client import DEFAULT_KEY_FILE, Client
from serving.stats import percentile


def worker_pids(client: Client, model: str) -> list[int]:
    return [w["pid"] for w in client.describe(model)[0]["workers"] if (w.get("pid") or 0) > 0]


def workers_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def error_message(response: requests.Response) -> str:
    """TorchServe's JSON error message, or the start of a body that is not one."""
    try:
        return str(response.json()["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def soak(
    client: Client,
    model: str,
    images: list[bytes],
    seconds: float,
    concurrency: int,
    max_requests: int = 100_000,
    warmup_s: float = 5.0,
    kill_worker_after: float | None = None,
) -> dict:
    """Run the load; returns the report (see the module docstring)."""
    client.wait_until_up(timeout=120)  # all workers READY, or measurements start mid-load
    start = time.monotonic()
    stop_at = start + seconds
    counter = itertools.count()
    lock = threading.Lock()
    results: list[tuple[float, int | str, float]] = []  # (start offset, status, latency s)
    errors: Counter[str] = Counter()  # the server's message for each request not answered 200
    pids_start = worker_pids(client, model)

    def loop():
        while time.monotonic() < stop_at:
            i = next(counter)
            if i >= max_requests:
                return
            t0 = time.monotonic()
            message = None
            try:
                response = client.predict_response(model, images[i % len(images)])
                status: int | str = response.status_code
                if status != 200:
                    message = error_message(response)
            except requests.RequestException as e:
                status = message = type(e).__name__
            with lock:
                results.append((t0 - start, status, time.monotonic() - t0))
                if message is not None:
                    errors[message] += 1

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(min(warmup_s, seconds))
    rss_warm = workers_rss_mb(worker_pids(client, model))
    killed = None
    if kill_worker_after is not None:
        time.sleep(max(0.0, kill_worker_after - warmup_s))
        killed = worker_pids(client, model)[0]
        os.kill(killed, signal.SIGKILL)
    for t in threads:
        t.join(timeout=seconds + client.timeout + 30)
    hung = sum(t.is_alive() for t in threads)
    elapsed = time.monotonic() - start
    statuses = Counter(str(s) for _, s, _ in results)
    ok_lat = [lat for _, s, lat in results if s == 200]
    lost = sum(n for s, n in statuses.items() if not s.isdigit() or int(s) >= 500)
    pids_end = worker_pids(client, model)
    rss_end = workers_rss_mb(pids_end)
    return {
        "model": model,
        "seconds": round(elapsed, 1),
        "concurrency": concurrency,
        "requests": len(results),
        "statuses": dict(statuses),
        "errors": dict(errors),
        "lost": lost,
        "hung_clients": hung,
        "throughput_rps": round(len(results) / elapsed, 1),
        "latency_ms": {
            q: round(1000 * percentile(ok_lat, p), 1)
            for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
        "worker_rss_mb": {
            "after_warmup": round(rss_warm, 1),
            "end": round(rss_end, 1),
            "growth_pct": round(100 * (rss_end / rss_warm - 1), 1) if rss_warm else None,
        },
        "worker_pids": {"start": pids_start, "killed": killed, "end": pids_end},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description="Concurrent load against a served model, with a report.")
    p.add_argument("--model", default="flying_objects", help="served model name")
    p.add_argument("--images", default="data/demo/test/*/*.jpg", help="glob of request images")
    p.add_argument("--seconds", type=float, default=60, help="duration of the run")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    p.add_argument("--warmup", type=float, default=10, help="seconds before the first memory reading")
    p.add_argument("--kill-worker-after", type=float, help="SIGKILL the worker after this many seconds")
    p.add_argument("--inference-url", default="http://127.0.0.1:8080", help="inference API (loopback)")
    p.add_argument("--management-url", default="http://127.0.0.1:8081", help="management API")
    p.add_argument("--key-file", default=DEFAULT_KEY_FILE, help="TorchServe's key_file.json")
    p.add_argument("--out", type=Path, help="also write the report as JSON here")
    a = p.parse_args(argv)
    for url in (a.inference_url, a.management_url):
        host = requests.utils.urlparse(url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            sys.exit(f"error: soak only targets loopback, not {host}")
    images = [Path(f).read_bytes() for f in sorted(Path().glob(a.images))]
    if not images:
        sys.exit(f"error: no images match {a.images}")
    client = Client(a.inference_url, a.management_url, a.key_file, timeout=60)
    print(f"soak: {a.model}, {a.concurrency} clients, {a.seconds:.0f} s ...", file=sys.stderr)
    report = soak(
        client, a.model, images, a.seconds, a.concurrency, a.max_requests, a.warmup, a.kill_worker_after
    )
    print(json.dumps(report, indent=2))
    if a.out:
        a.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
