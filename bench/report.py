"""Numbers to tables: percentiles, per-cell summaries, the ratio table, machine facts,
and the markdown written next to results.json (its tables made by ``table`` from rows)."""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess

from serving.stats import percentile

# Contestant keys, in table order, and how the tables name them.
SERVED = "served"
INPROCESS = "in_process"
BUILTIN = "builtin"
DEFAULT = "builtin_default"
FLASK = "flask"
NAMES = {
    SERVED: "TorchServe, project handler",
    INPROCESS: "in-process, no server",
    BUILTIN: "TorchServe, built-in handler, same settings",
    DEFAULT: "TorchServe out of the box (built-in handler, defaults)",
    FLASK: "Flask-style, per request",
}
# The chart (bench/chart.py), written beside results.md, which shows it.
CHART = "throughput.png"
# Ratio column -> the contestant that served is divided by.
RATIOS = {
    "served/in-process": INPROCESS,
    "served/built-in": BUILTIN,
    "served/out-of-box": DEFAULT,
    "served/flask": FLASK,
}


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


def per_request_ms(before: dict[str, float], after: dict[str, float], requests: int) -> dict | None:
    """CPU seconds spent between two snapshots ({part: seconds}) as ms per request, by part."""
    if not requests:
        return None
    return {k: round(1000 * (after[k] - before[k]) / requests, 2) for k in before}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return round(a / b, 3)


def ratio_table(throughput: dict) -> list[dict]:
    """Rows of served ÷ each other contestant.

    ``throughput[contestant][size][concurrency] = images/s``; the in-process figure has
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


def lscpu_model() -> str | None:
    """The CPU's model name as lscpu reports it; None where lscpu is missing or says nothing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")), None
    )


def cpuinfo_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown"
            )
    except OSError:
        return "unknown"


def machine() -> dict:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "cpu": lscpu_model() or cpuinfo_model(),
        "cores": os.cpu_count(),
        "usable_cores": affinity,
        "gpus": gpus,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other processes' load makes the numbers noisy: a quiet machine reads ~0 here.
        "load_average_1_5_15_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bf16": bf16_support(),
    }


def bf16_support() -> dict:
    """The CPU's bf16 flags and whether the handler's precision auto picks bf16 here."""
    from handlers.precision import BF16_FLAGS, cpu_flags, native_bf16

    native, why = native_bf16()
    return {"flags": [f for f in BF16_FLAGS if f in cpu_flags()], "native": native, "why": why}


DOG_APP = "dog_app"  # the dog apps' keys in the results (bench/dog_app.py), per precision
DOG_APPS = ("dog_breeds", "imagenet_dogs")  # the demo's two dog apps, the first one's key plain


def label(name: str, precision: str) -> str:
    """A model's name in the results and on the server: ``name``, ``name_bf16`` in bf16."""
    return name if precision == "fp32" else f"{name}_{precision}"


def dog_app_key(name: str, precision: str) -> str:
    """A dog app's key in the results: dog_app, dog_app_bf16, dog_app_imagenet_dogs, ..."""
    return label(DOG_APP if name == DOG_APPS[0] else f"{DOG_APP}_{name}", precision)


def dog_apps(results: dict) -> list[dict]:
    """The dog apps' results, one per app and precision measured, app by app."""
    from handlers.precision import RUN_PRECISIONS

    keys = (dog_app_key(n, p) for n in DOG_APPS for p in RUN_PRECISIONS)
    return [results[k] for k in keys if results.get(k)]


# -- markdown ---------------------------------------------------------------------------
def cell_text(v) -> str:
    """A table cell: – for no value, numbers to three significant digits (whole above 1000),
    a | in text escaped (it would end the cell)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v).replace("|", "\\|")


def is_number(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def table(rows: list[dict]) -> str:
    """``rows`` as a markdown table: a column per key, in the order keys first appear; a
    column holding only numbers is right-aligned."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    if not columns:
        return ""
    align = ["---:" if all(is_number(r.get(c)) for r in rows) else "---" for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell_text(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return percentile(values, 50) if values else None


def top_concurrency(results: dict) -> int:
    return max(results["settings"]["concurrency"])


def served_rate(model: dict, size: str, c: int) -> float | None:
    cells = model["cells"].get(SERVED, {}).get(size, [])
    return next((x["images_per_s"] for x in cells if x["concurrency"] == c), None)


def summary_rows(results: dict) -> list[dict]:
    """The headline: per app and set of photos, served images/s at the highest concurrency
    against the in-process figure for the same export."""
    c = top_concurrency(results)
    served_col = f"served img/s, c={c}"
    rows = []
    for name, model in results["models"].items():
        for size, ip in model["in_process"]["sizes"].items():
            served = served_rate(model, size, c)
            rows.append(
                {
                    "app": name,
                    "handler": "image_classifier",
                    "photos": f"generated {size} JPEGs",
                    served_col: served,
                    "in-process img/s": ip["best_images_per_s"],
                    "served ÷ in-process": ratio(served, ip["best_images_per_s"]),
                    "face check ms/photo": None,
                }
            )
    for dog in dog_apps(results):
        for group, g in dog.get("groups", {}).items():
            rows.append(
                {
                    "app": f"dog app ({dog['name']}, {dog.get('precision', 'fp32')})",
                    "handler": "dog_breeds",
                    "photos": f"{group}: {', '.join(g['photos'])}",
                    served_col: g["served_images_per_s"],
                    "in-process img/s": g["in_process_images_per_s"],
                    "served ÷ in-process": g["served/in-process"],
                    "face check ms/photo": g["face_check_ms_mean"],
                }
            )
    return rows


def contestant_rows(results: dict) -> list[dict]:
    return [
        {
            "contestant": NAMES[key],
            "key": key,
            "settings": f"skipped: {c['skipped']}" if c.get("skipped") else c["settings"],
        }
        for key, c in results["contestants"].items()
    ]


def server_rows(model: dict) -> list[dict]:
    return [
        {
            "contestant": key,
            "workers": s["workers"],
            "batch size": s["batch_size"],
            "max batch delay ms": s["max_batch_delay_ms"],
        }
        for key, s in (model.get("server_settings") or {}).items()
    ]


def ratio_rows(model: dict) -> list[dict]:
    return [
        {
            "size": r["size"],
            "concurrency": r["concurrency"],
            "served img/s": r["served_images_per_s"],
            **{col: r[col] for col in RATIOS},
        }
        for r in model["ratios"]
    ]


def cell_rows(cells: dict) -> list[dict]:
    """{contestant: {size: [cell]}} as one row per cell."""
    return [
        {
            "contestant": key,
            "photos": size,
            "concurrency": x["concurrency"],
            "img/s": x["images_per_s"],
            "p50 ms": x["latency_ms"]["p50"],
            "p90 ms": x["latency_ms"]["p90"],
            "p99 ms": x["latency_ms"]["p99"],
            "measured": x["measured_requests"],
            "errors": x["errors"],
            "CPU steal": percent(x.get("cpu_steal")),
            "frontend CPU ms/request": (x.get("server_cpu_ms_per_request") or {}).get("frontend"),
            "workers CPU ms/request": (x.get("server_cpu_ms_per_request") or {}).get("workers"),
        }
        for key, sizes in cells.items()
        for size, xs in sizes.items()
        for x in xs
    ]


def inprocess_rows(ip: dict) -> list[dict]:
    return [
        {
            "photos": size,
            **{f"batch {b} img/s": v for b, v in zip(ip["batch_sizes"], s["images_per_s_by_batch"])},
            "best img/s": s["best_images_per_s"],
            "best batch": s["best_batch_size"],
            "1-image p50 ms": (s["single_image_latency_ms"] or {}).get("p50"),
        }
        for size, s in ip["sizes"].items()
    ]


def lone_rows(lone: dict) -> list[dict]:
    return [
        {
            "contestant": key,
            "size": size,
            "client ms": d["client_ms"],
            "in the handler ms": d["handler_ms"],
            "outside the handler ms": d["outside_ms"],
            "requests": d["requests"],
            "in-process ms": d.get("in_process_ms"),
            "client − in-process ms": d.get("client_minus_in_process_ms"),
        }
        for key, sizes in lone.items()
        for size, d in sizes.items()
    ]


def dog_round_rows(dog: dict) -> list[dict]:
    """One row per set of photos and round: the served cell and the in-process run beside it."""
    rows = []
    for group, g in dog["groups"].items():
        for r, (cell, ip) in enumerate(zip(g["cells"], g["in_process"]), 1):
            size = ip["sizes"][group]
            rows.append(
                {
                    "photos": group,
                    "round": r,
                    "served img/s": cell["images_per_s"],
                    "served p50 ms": cell["latency_ms"]["p50"],
                    "served p99 ms": cell["latency_ms"]["p99"],
                    "errors": cell["errors"],
                    "in-process img/s": size["best_images_per_s"],
                    "in-process batch": size["best_batch_size"],
                    "served first": g["served_first"][r - 1],
                    "CPU steal (served)": percent(cell.get("cpu_steal")),
                }
            )
    return rows


def dog_photo_rows(dog: dict) -> list[dict]:
    return [
        {
            "photo": name,
            "set": group,
            "served answer": g["answers"][name]["served"],
            "in-process answer": g["answers"][name]["in_process"],
            "face check ms": g["face_check_ms"][name],
        }
        for group, g in dog["groups"].items()
        for name in g["photos"]
    ]


def preprocessing_rows(pre: dict) -> list[dict]:
    return [
        {
            "size": size,
            "plain ms": p["plain_ms"],
            "handler ms": p["handler_ms"],
            "ratio": p["ratio"],
            "max abs diff": p["max_abs_diff"],
            "mean abs diff": p["mean_abs_diff"],
            "CPU steal": percent(p.get("steal")),
        }
        for size, p in pre.items()
    ]


def header(results: dict, chart: str | None) -> list[str]:
    m = results["machine"]
    gpus = ", ".join(m.get("gpus") or []) or "no GPU"
    lines = [
        "# Serving benchmark",
        "",
        f"- Date: {m['date']}",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {gpus}; torch {m['torch']}, Python {m['python']}",
        f"- Command: `{results['command']}`",
        f"- bf16: {bf16_line(m.get('bf16'))}",
        f"- Load average at start {m['load_average_1_5_15_at_start'][0]}, at end "
        f"{m.get('load_average_1_5_15_at_end', ['?'])[0]}; CPU steal during the run "
        f"{percent(m.get('cpu_steal'))}; the run took {results.get('duration_s', 0) / 60:.1f} min",
        "",
    ]
    if results.get("smoke"):
        lines += ["**Smoke run**: tiny request counts; the numbers are not measurements.", ""]
    if chart:
        lines += [f"![images/s by concurrent clients, per model and photo size]({chart})", ""]
    return lines


def bf16_line(b: dict | None) -> str:
    if not b:
        return "not recorded"
    flags = ", ".join(b["flags"]) or "no bf16 flags"
    return f"CPU flags {flags}; " + ("native" if b["native"] else "emulated by oneDNN") + f" ({b['why']})"


def section(title: str, text: str, rows: list[dict]) -> list[str]:
    return [f"## {title}", "", *([text, ""] if text else []), table(rows), ""] if rows else []


def sub(title: str, rows: list[dict]) -> list[str]:
    return [f"**{title}**", "", table(rows), ""] if rows else []


METHOD = (
    "Closed-loop clients on the same machine, one keep-alive connection each, the photo as "
    "the raw body. Contestants compared with each other take turns cell by cell, so each pair "
    "is measured minutes apart at most. The in-process figure runs the same handler and "
    "model-config.yaml without the server, as the server's workers do: one process per worker "
    "with its threads, side by side, their images/s added up, at the best batch size. "
    "This machine is shared: compare ratios within a run, not images/s across runs."
)


def model_lines(name: str, model: dict) -> list[str]:
    lines = [f"## {name} ({model['origin']})", ""]
    lines += [
        f"{NAMES[key]} skipped for this model: {why}." for key, why in (model.get("skipped") or {}).items()
    ]
    st = model.get("startup")
    if st:
        lines += [
            f"TorchServe start to model READY: {st['start_to_ready_s']:.1f} s; "
            f"to first answer: {st['start_to_first_answer_s']:.1f} s.",
            "",
        ]
    lines += sub("Settings as TorchServe reports them", server_rows(model))
    lines += sub(
        "Served images/s divided by each other contestant's (same size and concurrency; "
        "the in-process figure: its best batch size)",
        ratio_rows(model),
    )
    lines += sub("Every cell", cell_rows(model["cells"]))
    lines += sub("In-process, images/s by batch size", inprocess_rows(model["in_process"]))
    lines += sub(
        "Lone requests, one at a time, p50: client latency, the worker's HandlerTime for the "
        "same request, and single images through the handler in-process between them",
        lone_rows(model.get("lone") or {}),
    )
    return lines


def precision_rows(results: dict) -> list[dict]:
    """Per model and photos measured in both precisions: bf16's rates against fp32's."""
    c = top_concurrency(results)
    rows = []
    for name, model in results["models"].items():
        other = results["models"].get(f"{name}_bf16")
        if other is None:
            continue
        for size, ip in model["in_process"]["sizes"].items():
            ip16 = other["in_process"]["sizes"].get(size, {}).get("best_images_per_s")
            s32, s16 = served_rate(model, size, c), served_rate(other, size, c)
            rows.append(
                {
                    "app": name,
                    "photos": f"generated {size} JPEGs",
                    f"served fp32 img/s, c={c}": s32,
                    "served bf16": s16,
                    "served bf16 ÷ fp32": ratio(s16, s32),
                    "in-process fp32 img/s": ip["best_images_per_s"],
                    "in-process bf16": ip16,
                    "in-process bf16 ÷ fp32": ratio(ip16, ip["best_images_per_s"]),
                }
            )
    dogs = {(d["name"], d.get("precision", "fp32")): d for d in dog_apps(results)}
    for app in dict.fromkeys(name for name, _ in dogs):
        if (app, "fp32") not in dogs or (app, "bf16") not in dogs:
            continue
        for group, g in dogs[app, "fp32"].get("groups", {}).items():
            h = dogs[app, "bf16"].get("groups", {}).get(group, {})
            rows.append(
                {
                    "app": f"dog app ({app})",
                    "photos": group,
                    f"served fp32 img/s, c={c}": g["served_images_per_s"],
                    "served bf16": h.get("served_images_per_s"),
                    "served bf16 ÷ fp32": ratio(h.get("served_images_per_s"), g["served_images_per_s"]),
                    "in-process fp32 img/s": g["in_process_images_per_s"],
                    "in-process bf16": h.get("in_process_images_per_s"),
                    "in-process bf16 ÷ fp32": ratio(
                        h.get("in_process_images_per_s"), g["in_process_images_per_s"]
                    ),
                }
            )
    return rows


def dog_lines(dog: dict) -> list[str]:
    title = f"{dog['name']}, {dog.get('precision', 'fp32')}"
    lines = [f"## The dog app: {title} with handlers/dog_breeds.py ({dog['origin']})", ""]
    lines += [f"No {group}: {why}." for group, why in dog.get("missing", {}).items()]
    if not dog.get("groups"):
        return lines + [""]
    lines += [
        f"Served at concurrency {dog['concurrency']}; each set of photos' served cell and "
        "in-process run take turns, the order flipping each round; the figures above are the "
        "medians of the rounds. Face check: the handler's grey copy and, for a photo that is "
        "not a dog, its face search, per photo on the in-process threads (for a dog photo the "
        "grey copy alone, which the handler makes for every photo).",
        "",
    ]
    lines += sub("Rounds", dog_round_rows(dog))
    lines += sub("Photos", dog_photo_rows(dog))
    return lines


def markdown(results: dict, chart: str | None = CHART) -> str:
    """The results as markdown: the header (date, machine, command), then tables."""
    lines = header(results, chart)
    lines += section("Summary", METHOD, summary_rows(results))
    lines += section(
        "Contestants", f"Environment of every contestant: {results['environment']}.", contestant_rows(results)
    )
    for name, model in results["models"].items():
        lines += model_lines(name, model)
    for dog in dog_apps(results):
        lines += dog_lines(dog)
    lines += section(
        "bf16 against fp32",
        "The same export and photos; served at the highest concurrency, in-process at its "
        "best batch size; ratios of the same run.",
        precision_rows(results),
    )
    lines += section(
        "Preprocessing alone",
        "One thread, median, the two paths taking turns: the plain "
        "PIL path (full decode + eval transform) against the handler's.",
        preprocessing_rows(results.get("preprocessing") or {}),
    )
    return "\n".join(lines)
