"""Closed-loop load: ``concurrency`` client threads, each with one keep-alive connection,
each sending one JPEG as the raw body and waiting for the answer before sending the next.

Kept light on purpose (the clients share the machine's cores with the server): http.client,
no JSON parsing, latency from time.perf_counter around request + full read of the answer.
The threads run in this process, or spread over several forked ones for servers that
answer faster than one Python process can ask (run_load's ``processes``).

Measurement: the threads run without pause through a warm-up and a measured window.
The window opens at the answer that ends the warm-up and closes at the answer that
completes the measured count (both boundaries are answers, so a server that answers a
batch at a time is not over- or under-counted by a partial batch); throughput is the
answers inside it divided by its length. Latencies are those of every request *started*
inside the window (each is waited for), so slow requests at the end are not dropped.
"""

from __future__ import annotations

import http.client
import multiprocessing
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
    return {"Content-Type": "application/octet-stream", "Content-Length": str(len(body)), **target.headers}


def one(target: Target, body: bytes) -> tuple[int, bytes]:
    """A single request on its own connection (answer checks, warm-up)."""
    conn, path = target.connect()
    try:
        return post(conn, path, body, request_headers(target, body))
    finally:
        conn.close()


class _Clients:
    """Client threads for the client indices ``ks`` (of ``concurrency``), in this process.

    Client k sends images[k], images[k + concurrency], ...; every answer adds one to the
    shared ``count`` (a multiprocessing.Value, so that the process running the cell can
    read it whichever process the client lives in); ``stop`` ends every loop."""

    def __init__(
        self, target: Target, images: list[bytes], ks: list[int], concurrency: int, count, stop
    ) -> None:
        self.records: list[list[tuple[float, float, int]]] = [[] for _ in ks]
        self.failures: list[str] = []
        lock = threading.Lock()

        def client(k: int, mine: list) -> None:
            conn, path = target.connect()
            i = k
            while not stop.is_set():
                body = images[i % len(images)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    status, _ = post(conn, path, body, request_headers(target, body))
                except (http.client.HTTPException, OSError) as e:
                    status = 0
                    with lock:
                        self.failures.append(f"{type(e).__name__}: {e}")
                mine.append((t0, time.perf_counter(), status))
                with count.get_lock():
                    count.value += 1
            conn.close()

        self.timeout = target.timeout
        self.threads = [
            threading.Thread(target=client, args=(k, mine), daemon=True) for k, mine in zip(ks, self.records)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> tuple[list[tuple[float, float, int]], list[str]]:
        """Wait for the clients (after ``stop``): every (start, end, status) row, failures."""
        for t in self.threads:
            t.join(self.timeout + 5)
        return [r for mine in self.records for r in mine], self.failures


def _client_process(target, images, ks, concurrency, count, stop, go, results) -> None:
    clients = _Clients(target, images, ks, concurrency, count, stop)
    go.wait()
    clients.start()
    stop.wait()
    results.put(clients.join())


def run_load(
    target: Target,
    images: list[bytes],
    concurrency: int,
    requests: int,
    warmup_requests: int,
    max_seconds: float,
    processes: int = 1,
) -> dict:
    """Drive ``target`` with ``concurrency`` clients; returns the cell's raw numbers.

    The window opens after ``warmup_requests`` answers and closes after ``requests``
    more, or ``max_seconds`` after the start (then it ends at that time: see
    window_closed_by). Errors (non-200 answers, failed connections) are counted over
    the whole run, warm-up included.

    ``processes`` > 1 spreads the clients over that many forked processes (at most one
    per client): one Python process's client threads share one interpreter lock, which
    caps what it can send at a few thousand requests/s, below a GPU server's rate. Their
    times are comparable: time.perf_counter is the system-wide monotonic clock on Linux.
    """
    processes = max(1, min(processes, concurrency))
    ctx = multiprocessing.get_context("fork") if processes > 1 else multiprocessing
    count, stop = ctx.Value("q", 0), ctx.Event()
    groups = [list(range(p, concurrency, processes)) for p in range(processes)]
    start = time.perf_counter()
    if processes == 1:
        local = _Clients(target, images, groups[0], concurrency, count, stop)
        local.start()
    else:
        go, results = ctx.Event(), ctx.Queue()
        children = [
            ctx.Process(
                target=_client_process,
                daemon=True,
                args=(target, images, ks, concurrency, count, stop, go, results),
            )
            for ks in groups
        ]
        for child in children:
            child.start()
        go.set()
    try:
        while count.value < warmup_requests + requests and time.perf_counter() - start < max_seconds:
            time.sleep(POLL_S)
        t_cap = time.perf_counter()
    finally:
        stop.set()
        if processes == 1:
            rows, failures = local.join()
        else:
            rows, failures = [], []
            try:
                for _ in children:  # read the queue before joining: a child waits until its rows are read
                    r, f = results.get(timeout=target.timeout + 30)
                    rows += r
                    failures += f
            finally:
                for child in children:
                    child.join(10)
                    if child.is_alive():
                        child.terminate()
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
        "client_processes": processes,
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
