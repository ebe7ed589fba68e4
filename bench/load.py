"""Closed-loop load: ``concurrency`` client threads, each with one keep-alive connection,
each sending one JPEG as the raw body and waiting for the answer before sending the next.

Kept light on purpose (the clients share the machine's cores with the server): http.client,
no JSON parsing, latency from time.perf_counter around request + full read of the answer.

Measurement: the threads run without pause through a warm-up and a measured window.
The window opens at the answer that ends the warm-up and closes at the answer that
completes the measured count (both boundaries are answers, so a server that answers a
batch at a time is not over- or under-counted by a partial batch); throughput is the
answers inside it divided by its length. Latencies are those of every request *started*
inside the window (each is waited for), so slow requests at the end are not dropped.
"""
from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

POLL_S = 0.01


@dataclass
class Target:
    """Where to send images: an URL like http://127.0.0.1:8080/predictions/name, and headers."""

    url: str
    headers: dict = field(default_factory=dict)
    timeout: float = 300.0

    def connect(self) -> tuple[http.client.HTTPConnection, str]:
        u = urlsplit(self.url)
        return http.client.HTTPConnection(u.hostname, u.port, timeout=self.timeout), u.path


def post(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    """One request on a kept-alive connection (http.client reopens it if the server closed it)."""
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    except (http.client.HTTPException, OSError):
        conn.close()  # the next request opens a fresh connection
        raise


def request_headers(target: Target, body: bytes) -> dict:
    return {"Content-Type": "application/octet-stream", "Content-Length": str(len(body)),
            **target.headers}


def one(target: Target, body: bytes) -> tuple[int, bytes]:
    """A single request on its own connection (answer checks, warm-up)."""
    conn, path = target.connect()
    try:
        return post(conn, path, body, request_headers(target, body))
    finally:
        conn.close()


def run_load(target: Target, images: list[bytes], concurrency: int, requests: int,
             warmup_requests: int, max_seconds: float) -> dict:
    """Drive ``target`` with ``concurrency`` clients; returns the cell's raw numbers.

    The window opens after ``warmup_requests`` answers and closes after ``requests``
    more, or ``max_seconds`` after the start (then it ends at that time: see
    window_closed_by). Errors (non-200 answers, failed connections) are counted over
    the whole run, warm-up included.
    """
    lock = threading.Lock()
    done = [0]
    stop = threading.Event()
    records: list[list[tuple[float, float, int]]] = [[] for _ in range(concurrency)]
    failures: list[str] = []

    def client(k: int) -> None:
        conn, path = target.connect()
        mine, i = records[k], k
        while not stop.is_set():
            body = images[i % len(images)]
            i += concurrency
            t0 = time.perf_counter()
            try:
                status, _ = post(conn, path, body, request_headers(target, body))
            except (http.client.HTTPException, OSError) as e:
                status = 0
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")
            mine.append((t0, time.perf_counter(), status))
            with lock:
                done[0] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    try:
        while done[0] < warmup_requests + requests and time.perf_counter() - start < max_seconds:
            time.sleep(POLL_S)
        t_cap = time.perf_counter()
    finally:
        stop.set()
        for t in threads:
            t.join(target.timeout + 5)
    rows = [r for mine in records for r in mine]
    ends = sorted(r[1] for r in rows if r[1] <= t_cap)
    t_open = ends[warmup_requests - 1] if 0 < warmup_requests <= len(ends) else start
    if len(ends) >= warmup_requests + requests:
        t_close, closed_by = ends[warmup_requests + requests - 1], "count"
    else:
        t_close, closed_by = t_cap, "time"
    completed = sum(1 for t in ends if t_open < t <= t_close)
    started = [r for r in rows if t_open <= r[0] <= t_close]
    errors = [r for r in rows if r[2] != 200]
    window = t_close - t_open
    return {
        "concurrency": concurrency,
        "requests_target": requests,
        "window_closed_by": closed_by,
        "window_s": window,
        "completed_in_window": completed,
        "images_per_s": completed / window if window > 0 else 0.0,
        "latencies_s": [t1 - t0 for t0, t1, _ in started],
        "total_requests": len(rows),
        "errors": len(errors),
        "error_statuses": sorted({r[2] for r in errors}),
        "failures": failures[:5],
    }
