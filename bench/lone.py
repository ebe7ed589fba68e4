"""Lone requests: one at a time to a served model, each read against the worker's own
HandlerTime for it, and optionally paired with the same image timed in-process."""

from __future__ import annotations

import time

from bench import report
from bench.load import Target, post, request_headers


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


def lone_requests(
    client,
    target: Target,
    model: str,
    images: dict[str, list[bytes]],
    count: int,
    timer=None,
    wait_s: float = 1.0,
) -> dict:
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
            d = out[size] = {
                "client_ms": p50([c for c, _ in rows]),
                "handler_ms": p50([h for _, h in rows]),
                "outside_ms": p50([c - h for c, h in rows]),
                "requests": len(rows),
            }
            line = (
                f"    lone requests {size}: client p50 {d['client_ms']} ms, in the handler "
                f"{d['handler_ms']} ms, outside it {d['outside_ms']} ms ({len(rows)} of {count} read)"
            )
            if inproc and d["client_ms"] is not None:
                d["in_process_ms"] = p50(inproc)
                d["client_minus_in_process_ms"] = round(d["client_ms"] - d["in_process_ms"], 2)
                line += f"; in-process between them {d['in_process_ms']} ms"
            print(line, flush=True)
    finally:
        conn.close()
    return out
