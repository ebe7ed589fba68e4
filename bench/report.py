"""Numbers to tables: percentiles, per-cell summaries, the ratio table, machine facts,
and the markdown written next to results.json."""
from __future__ import annotations

import datetime
import math
import os
import platform

# Contestant keys, in table order, and how the tables name them.
SERVED = "served"
INPROCESS = "in_process"
BUILTIN = "builtin"
DEFAULT = "builtin_default"
FLASK = "flask"
NAMES = {SERVED: "TorchServe, project handler", INPROCESS: "in-process limit",
         BUILTIN: "TorchServe, built-in handler, same settings",
         DEFAULT: "TorchServe out of the box (built-in handler, defaults)",
         FLASK: "Flask-style, per request"}
# The chart (bench/chart.py), written beside results.md, which shows it.
CHART = "throughput.png"
# Ratio column -> the contestant that served is divided by.
RATIOS = {"served/in-process": INPROCESS, "served/built-in": BUILTIN,
          "served/out-of-box": DEFAULT, "served/flask": FLASK}


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default 'linear' method); NaN for no values."""
    s = sorted(values)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_ms(latencies_s) -> dict:
    return {f"p{q}": round(1000 * percentile(latencies_s, q), 2) for q in (50, 90, 99)}


def summarize(cell: dict) -> dict:
    """A load cell without its raw latencies: throughput, p50/p90/p99 (ms), counts."""
    out = {k: v for k, v in cell.items() if k != "latencies_s"}
    out["images_per_s"] = round(cell["images_per_s"], 2)
    out["window_s"] = round(cell["window_s"], 2)
    out["latency_ms"] = latency_ms(cell["latencies_s"])
    out["measured_requests"] = len(cell["latencies_s"])
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return round(a / b, 3)


def ratio_table(throughput: dict) -> list[dict]:
    """Rows of served ÷ each other contestant.

    ``throughput[contestant][size][concurrency] = images/s``; the in-process limit has
    one number per size (its best batch size), used for every concurrency. Missing
    contestants (skipped) give None.
    """
    served = throughput.get(SERVED, {})
    rows = []
    for size, by_c in served.items():
        for c, ips in sorted(by_c.items()):
            row = {"size": size, "concurrency": c, "served_images_per_s": ips}
            for col, other in RATIOS.items():
                o = throughput.get(other, {}).get(size)
                o = o if other == INPROCESS or o is None else o.get(c)
                row[col] = ratio(ips, o)
            rows.append(row)
    return rows


def cpu_snapshot(stat: str = "/proc/stat") -> dict | None:
    """The machine's CPU time so far, in clock ticks, by kind (the ``cpu`` line of
    /proc/stat); None where there is no such file."""
    try:
        with open(stat) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {k: int(v) for k, v in zip(names, fields[1:])}


def steal_share(before: dict | None, after: dict | None) -> float | None:
    """Share of the CPU time between two snapshots that the hypervisor gave to other
    machines (steal): on a shared VM, the part of the cores a benchmark did not get.
    0 on a machine of its own; None when unknown."""
    if not before or not after or "steal" not in before or "steal" not in after:
        return None
    total = sum(after.values()) - sum(before.values())
    if total <= 0:
        return None
    return round((after["steal"] - before["steal"]) / total, 3)


def take_turns(keys, rounds):
    """(round, key) pairs: every key once per round, the order flipping from round to round
    (a b, b a, a b, ...), so that things compared are measured close together in time and
    none is always first: this shared machine's speed drifts by the minute."""
    order = list(keys)
    for r in rounds:
        for key in order:
            yield r, key
        order.reverse()


def percent(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.0f}%"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": affinity, "gpus": gpus,
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(),
            # Other processes' load makes the numbers noisy: a quiet machine reads ~0 here.
            "load_average_1_5_15_at_start": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _fmt(v, digits=2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(results: dict) -> str:
    """The results as markdown: machine, command, settings, ratio and per-model tables."""
    m, lines = results["machine"], []
    gpus = f", GPU: {', '.join(m['gpus'])}" if m.get("gpus") else ", no GPU"
    lines += [f"Serving benchmark, {m['date']}: {m['cpu']}, {m['cores']} cores{gpus}, torch {m['torch']}, "
              f"Python {m['python']}; load average at start {m['load_average_1_5_15_at_start'][0]}, "
              f"at end {m.get('load_average_1_5_15_at_end', ['?'])[0]}; "
              f"CPU steal during the run {percent(m.get('cpu_steal'))}; "
              f"run took {results.get('duration_s', 0) / 60:.1f} min.", "",
              "CPU steal is the share of the cores' time the hypervisor gave to other machines "
              "(0% on a machine of its own); the cell table shows it per cell: compare ratios "
              "between cells of similar steal.", "",
              f"Command: `{results['command']}`", "",
              f"![images/s by concurrent clients, per model and photo size]({CHART})", ""]
    if results.get("smoke"):
        lines += ["**Smoke run**: tiny request counts; the numbers are not measurements.", ""]
    lines += ["Contestants and settings:", ""]
    for key, c in results["contestants"].items():
        what = f"skipped: {c['skipped']}" if c.get("skipped") else c["settings"]
        lines.append(f"- **{NAMES[key]}** (`{key}`): {what}")
    lines += [f"- environment of every contestant: {results['environment']}", ""]
    st = results["settings"]
    procs = st.get("client_processes", 1)
    spread = (f"spread over up to {procs} processes, never more than clients" if procs > 1
              else "in one process")
    lines += [f"Method: closed-loop clients on the same machine ({spread}), "
              f"one keep-alive connection each, "
              f"the JPEG as the raw body. The project's handler and the built-in one run on one "
              f"server, their cells alternating (size by size, concurrency by concurrency), so each "
              f"pair is measured minutes apart at most. Per cell: warm-up {st['warmup_requests']}; measured "
              f"requests {st['requests']}; time budget {st['max_cell_seconds']:g} s per cell (a slow "
              f"contestant is measured on fewer requests: see `measured`). Images: "
              + ", ".join(f"{k} ({v['count']} JPEGs, ~{sum(v['bytes']) / len(v['bytes']) / 1e3:.0f} kB)"
                          for k, v in st["images"].items()) + ".", ""]
    for name, model in results["models"].items():
        lines += [f"### {name} ({model['origin']})", ""]
        for key, why in (model.get("skipped") or {}).items():
            lines += [f"{NAMES[key]} skipped for this model: {why}.", ""]
        actual = model.get("server_settings") or {}
        if actual:
            lines += ["Settings as TorchServe reports them: " + "; ".join(
                f"{key}: {s['workers']} workers, batch size {s['batch_size']}, "
                f"max batch delay {s['max_batch_delay_ms']} ms" for key, s in actual.items()) + ".", ""]
        st = model.get("startup")
        if st:
            lines += [f"TorchServe start to model READY: {st['start_to_ready_s']:.1f} s; "
                      f"to first answer: {st['start_to_first_answer_s']:.1f} s.", ""]
        lines += ["Ratios: served images/s divided by the other contestant's at the same size and "
                  "concurrency (the in-process limit: its best batch size); above 1, served is faster.", "",
                  "| size | concurrency | " + " | ".join(RATIOS) + " | served img/s |",
                  "|---|---:|" + "---:|" * len(RATIOS) + "---:|"]
        for r in model["ratios"]:
            lines.append(f"| {r['size']} | {r['concurrency']} | "
                         + " | ".join(_fmt(r[col]) for col in RATIOS)
                         + f" | {_fmt(r['served_images_per_s'], 1)} |")
        lines += ["", "| contestant | size | concurrency | img/s | p50 ms | p90 ms | p99 ms | measured | errors | steal |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, sizes in model["cells"].items():
            for size, cells in sizes.items():
                for c in cells:
                    lat = c["latency_ms"]
                    lines.append(f"| {key} | {size} | {c['concurrency']} | {c['images_per_s']:.1f} | "
                                 f"{lat['p50']:.1f} | {lat['p90']:.1f} | {lat['p99']:.1f} | "
                                 f"{c['measured_requests']} | {c['errors']} | {percent(c.get('cpu_steal'))} |")
        ip = model.get("in_process")
        if ip:
            lines += ["", f"In-process limit (images/s by batch size; single-image latency; CPU steal "
                          f"{percent(ip.get('cpu_steal'))}):", "",
                      "| size | " + " | ".join(f"batch {b}" for b in ip["batch_sizes"]) + " | best | 1-image p50 ms |",
                      "|---|" + "---:|" * (len(ip["batch_sizes"]) + 2)]
            for size, s in ip["sizes"].items():
                lines.append(f"| {size} | " + " | ".join(f"{v:.1f}" for v in s["images_per_s_by_batch"])
                             + f" | {s['best_images_per_s']:.1f} (batch {s['best_batch_size']}) | "
                             f"{_fmt((s['single_image_latency_ms'] or {}).get('p50'), 1)} |")
        lc = model.get("latency_check")
        if lc:
            lines += ["", "p50 at concurrency 1, served vs in-process single image on the threads one "
                      "request gets in a worker, timed minutes apart (the 10 ms target reads the "
                      "lone requests' paired timings below where there are any); the last column is "
                      "one image on all the in-process threads:", "",
                      "| size | served p50 ms | in-process ms (threads) | difference ms | in-process, all threads ms |",
                      "|---|---:|---:|---:|---:|"]
            for size, d in lc.items():
                lines.append(f"| {size} | {d['served_p50_ms']:.1f} | {d['in_process_ms']:.1f} "
                             f"({d.get('in_process_threads', '?')}) | {d['difference_ms']:+.1f} | "
                             f"{_fmt(d.get('in_process_all_threads_ms'), 1)} |")
        lone = model.get("lone")
        if lone:
            lines += ["", "Lone requests after the cells, one at a time on a kept-alive connection: "
                      "client latency and the worker's own HandlerTime for the same request (p50 "
                      "ms). Their difference is what the server adds, and does not move with the "
                      "machine's speed as timings taken minutes apart do. Between the served ones, "
                      "the same images one at a time through the handler in another process on one "
                      "worker's threads (in-process): the concurrency-1 target, timed in the same "
                      "minutes:", "",
                      "| contestant | size | client | in the handler | outside the handler | requests "
                      "| in-process | client − in-process |",
                      "|---|---|---:|---:|---:|---:|---:|---:|"]
            for key, sizes in lone.items():
                for size, d in sizes.items():
                    paired = d.get("client_minus_in_process_ms")
                    lines.append(f"| {key} | {size} | {_fmt(d['client_ms'], 1)} | {_fmt(d['handler_ms'], 1)} | "
                                 f"{_fmt(d['outside_ms'], 1)} | {d['requests']} | "
                                 f"{_fmt(d.get('in_process_ms'), 1)} | "
                                 f"{_fmt(paired) if paired is None else f'{paired:+.1f}'} |")
        lines.append("")
    pre = results.get("preprocessing")
    if pre:
        lines += ["Preprocessing alone, one thread, median, the two paths taking turns: the plain "
                  "PIL path (full decode + eval transform) vs the handler's (reduced JPEG decoding, "
                  "one resampling for resize + crop):", "",
                  "| size | plain ms | handler ms | ratio | max / mean abs diff (normalised tensor) | steal |",
                  "|---|---:|---:|---:|---:|---:|"]
        for size, p in pre.items():
            lines.append(f"| {size} | {p['plain_ms']:.1f} | {p['handler_ms']:.1f} | {p['ratio']:.3f} | "
                         f"{p['max_abs_diff']:.3f} / {p['mean_abs_diff']:.4f} | "
                         f"{percent(p.get('steal'))} |")
        lines.append("")
    if results.get("targets"):
        lines += ["Targets:", ""]
        lines += [f"- {t['what']}: {t['value']} ({'met' if t['met'] else 'NOT met'})"
                  for t in results["targets"]]
        lines.append("")
    return "\n".join(lines)
