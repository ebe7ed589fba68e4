"""The serving benchmark's harness (bench/): the smoke version end to end, and its arithmetic.

The smoke run is real: TorchServe on loopback, the Flask-style server as a subprocess,
the in-process figure as a subprocess, on a randomly initialised MobileNetV2; then the dog
app (a random ResNet50 beside the pretrained EfficientNet-Lite0 dog detector, under
handlers/dog_breeds.py) on the real photos of training/demo/photos.py and ../shared/photos. It
checks that the harness works and what it writes, not speed. The built-in-handler contestants
need captum (requirements-bench.txt, which `make test` installs): the smoke run requires it,
so that they really run; without it they are reported as skipped, with that reason (the
last tests here hide captum to see that).
"""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing
import os
import shlex
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest
import torch

from bench import chart, dog_app, harness, inprocess, preprocess, report
from bench import run as bench_run
from bench.load import Target, run_load
from bench.run import main as bench_main
from tests.conftest import FLOAT_ROUNDING, ONE_GREY_LEVEL, shared_photo


def test_percentile_interpolates_between_order_statistics():
    values = [5, 1, 4, 2, 3]  # unsorted on purpose
    assert report.percentile(values, 0) == 1
    assert report.percentile(values, 50) == 3
    assert report.percentile(values, 100) == 5
    assert report.percentile(values, 90) == pytest.approx(4.6)  # 4 + 0.6 * (5 - 4)
    assert report.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert report.percentile([7.0], 99) == 7.0
    assert math.isnan(report.percentile([], 50))


def test_latency_summary_in_ms():
    lat = report.latency_ms([0.010, 0.020, 0.030, 0.040, 0.050])
    assert lat == {"p50": 30.0, "p90": 46.0, "p99": 49.6}


def test_server_cpu_per_request_between_two_snapshots():
    before = {"frontend": 1.0, "workers": 2.0}
    after = {"frontend": 1.5, "workers": 4.0}
    assert report.per_request_ms(before, after, 100) == {"frontend": 5.0, "workers": 20.0}
    assert report.per_request_ms(before, after, 0) is None  # nothing answered: no figure


def test_cpu_steal_share_between_two_snapshots(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n")
    before = report.cpu_snapshot(str(stat))
    assert before == {
        "user": 100,
        "nice": 0,
        "system": 50,
        "idle": 800,
        "iowait": 10,
        "irq": 0,
        "softirq": 0,
        "steal": 40,
    }
    stat.write_text("cpu  160 0 70 900 10 0 0 90 0 0\n")
    after = report.cpu_snapshot(str(stat))
    # 60 + 20 + 100 + 50 = 230 ticks passed, 50 of them stolen.
    assert report.steal_share(before, after) == round(50 / 230, 3)
    assert report.steal_share(after, after) is None  # no time passed
    assert report.steal_share(None, after) is None
    assert report.cpu_snapshot(str(tmp_path / "missing")) is None
    assert report.percent(0.217) == "22%" and report.percent(None) == "–"


def test_contestants_take_turns_cell_by_cell(monkeypatch):
    """Compared contestants run each cell one after the other, the order flipping, so each
    pair is measured close together in time."""
    calls = []

    def server_cpu():  # the shared server's CPU, handed to every cell
        return {}

    def fake_cell(a, label, target, size, imgs, c, ip_rate, cpu):
        assert cpu is server_cpu
        calls.append((label, size, c))
        return {"concurrency": c, "label": label}

    monkeypatch.setattr(harness, "run_cell", fake_cell)
    a = bench_run.parse_args(["--concurrency", "1", "8"])
    images = {"500x375": [b"x"], "4000x3000": [b"y"]}
    out = harness.run_cells(a, {"served": ("s", None), "builtin": ("b", None)}, images, {}, server_cpu)
    assert calls == [
        ("s", "500x375", 1),
        ("b", "500x375", 1),
        ("b", "500x375", 8),
        ("s", "500x375", 8),
        ("s", "4000x3000", 1),
        ("b", "4000x3000", 1),
        ("b", "4000x3000", 8),
        ("s", "4000x3000", 8),
    ]
    assert [c["label"] for c in out["served"]["4000x3000"]] == ["s", "s"]
    assert [c["concurrency"] for c in out["builtin"]["500x375"]] == [1, 8]


def test_preprocessing_paths_take_turns(monkeypatch):
    """The plain and the handler's path alternate, the order flipping each round, and each
    median is of its own path's times."""
    calls, clock = [], iter(range(1000))
    monkeypatch.setattr(preprocess.time, "perf_counter", lambda: next(clock) / 1000)
    fns = {"a": lambda: calls.append("a"), "b": lambda: [calls.append("b"), next(clock)]}
    ms = preprocess.paired_medians_ms(fns, repeats=3)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up, then turns
    assert ms == pytest.approx({"a": 1.0, "b": 2.0})  # b reads the clock once more: 2 ms


def test_ratio_table_divides_served_by_each_contestant():
    tp = {
        report.SERVED: {"small": {1: 40.0, 8: 90.0}},
        report.INPROCESS: {"small": 100.0},  # one number per size: its best batch size
        report.BUILTIN: {"small": {1: 20.0, 8: 30.0}},
        report.FLASK: {"small": {1: 50.0, 8: 45.0}},
    }  # no builtin_default: skipped
    rows = report.ratio_table(tp)
    assert [(r["size"], r["concurrency"]) for r in rows] == [("small", 1), ("small", 8)]
    assert rows[0] == {
        "size": "small",
        "concurrency": 1,
        "served_images_per_s": 40.0,
        "served/in-process": 0.4,
        "served/built-in": 2.0,
        "served/out-of-box": None,
        "served/flask": 0.8,
    }
    assert rows[1]["served/in-process"] == 0.9
    assert rows[1]["served/built-in"] == 3.0
    assert rows[1]["served/flask"] == 2.0


class _PeerServer(ThreadingHTTPServer):
    """A loopback server that answers every POST with 200 after ``delay_s`` and records
    which process owns each client connection (from the kernel's socket table, not from
    anything the client says)."""

    def __init__(self, delay_s: float = 0.002, body: bytes = b"ok"):
        self.delay_s, self.pids, self._seen = delay_s, set(), set()
        self.body, self.posts, self.lock = body, 0, threading.Lock()
        super().__init__(("127.0.0.1", 0), _PeerHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def peer_pid(self, port: int) -> int | None:
        for c in psutil.net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.raddr and c.raddr.port == self.server_address[1]:
                return c.pid
        return None


class _PeerHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the load generator expects

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        port = self.client_address[1]
        if port not in self.server._seen:  # one lookup per connection
            self.server._seen.add(port)
            self.server.pids.add(self.server.peer_pid(port))
        time.sleep(self.server.delay_s)
        with self.server.lock:
            self.server.posts += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("processes", [1, 3])
def test_load_spreads_its_clients_over_processes(processes):
    """The clients run in the asked number of processes (the server sees connections from
    that many, and from this process only with one), the window still counts exactly the
    requests asked for, and no client process is left behind."""
    server = _PeerServer()
    try:
        r = run_load(
            Target(f"http://127.0.0.1:{server.server_address[1]}/p"),
            [b"x" * 100, b"y" * 50],
            concurrency=6,
            requests=60,
            warmup_requests=6,
            max_seconds=60,
            processes=processes,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert r["client_processes"] == processes
    assert len(server.pids) == processes and None not in server.pids
    assert (server.pids == {os.getpid()}) == (processes == 1)
    assert r["window_closed_by"] == "count" and r["completed_in_window"] == 60
    assert r["errors"] == 0 and r["total_requests"] >= 66
    # Latencies are of the requests started inside the window. Of the 60 answered in it, at
    # most concurrency - 1 were started before it opened (the client whose answer opened it
    # starts its next one after); at most concurrency are still running when it closes.
    assert 60 - (6 - 1) <= len(r["latencies_s"]) <= 60 + 6
    assert min(r["latencies_s"]) >= server.delay_s
    assert multiprocessing.active_children() == []


def test_load_never_uses_more_processes_than_clients():
    server = _PeerServer(delay_s=0)
    try:
        r = run_load(
            Target(f"http://127.0.0.1:{server.server_address[1]}/p"),
            [b"x"],
            concurrency=2,
            requests=10,
            warmup_requests=2,
            max_seconds=60,
            processes=8,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert r["client_processes"] == 2 and len(server.pids) == 2


@pytest.mark.parametrize("warm_s", [0.0, 0.8])
def test_warm_up_loads_the_server_for_warm_seconds(warm_s):
    """Two single requests and a burst of 2 always (each burst client may send one more
    before it stops); with --warm-seconds, load at the top concurrency for that long on top:
    4 clients of 10 ms answers make ~300 in 0.8 s, and 40 leaves room for a slow machine."""
    server = _PeerServer(delay_s=0.01, body=b'{"cat": 0.9}')
    a = bench_run.parse_args(["--concurrency", "1", "4", "--warm-seconds", str(warm_s)])
    t0 = time.perf_counter()
    try:
        harness.warm(a, Target(f"http://127.0.0.1:{server.server_address[1]}/p"), {"s": [b"x"]}, "builtin", 2)
    finally:
        server.shutdown()
        server.server_close()
    took = time.perf_counter() - t0
    if warm_s:
        assert took >= warm_s and server.posts >= 40, (took, server.posts)
    else:
        assert 2 + 2 <= server.posts <= 2 + 2 * 2, server.posts


def test_device_cpu_runs_every_contestant_without_gpus(monkeypatch):
    monkeypatch.setattr(bench_run, "cuda_devices", lambda: 2)  # even on a GPU machine
    a = bench_run.parse_args(["--device", "cpu"])
    assert (a.device, a.gpus) == ("cpu", 0)
    assert "--gpu" not in harness.inprocess_command(a, bench_run.ROOT, {}, bench_run.ROOT / "x.json")
    assert bench_run.default_workers(a) == os.cpu_count()  # TorchServe's default: one per core


def test_device_auto_takes_the_gpu_where_torch_sees_one(monkeypatch):
    monkeypatch.setattr(bench_run, "cuda_devices", lambda: 2)
    a = bench_run.parse_args([])
    assert (a.device, a.gpus) == ("cuda", 2)
    cmd = harness.inprocess_command(a, bench_run.ROOT, {}, bench_run.ROOT / "x.json")
    assert cmd[cmd.index("--gpu") + 1] == "0"
    assert bench_run.default_workers(a) == 2  # TorchServe's default: one worker per GPU
    # the same defaults as on the CPU: none of them was ever measured on a GPU
    assert a.concurrency == [1, 8, 32] and a.inprocess_batch_sizes == [1, 4, 8, 16]
    assert a.client_processes == 1


def test_device_cuda_without_a_gpu_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(bench_run, "cuda_devices", lambda: 0)
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err
    assert bench_run.parse_args([]).device == "cpu"


def shown(v) -> str:
    """A figure as the report's tables show it: three significant digits, whole from 1000."""
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def has_row(md: str, *cells) -> bool:
    """Whether a line of the markdown starts with these cells, in this order."""
    prefix = "| " + " | ".join(shown(c) for c in cells) + " |"
    return any(line.startswith(prefix) for line in md.splitlines())


def _bench_processes(root) -> list[str]:
    """Command lines of processes started for the benchmark under ``root``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        # TorchServe's frontend and workers name the config file under root; the
        # Flask-style server names its export folder under root.
        if str(root) in cmd:
            found.append(cmd)
    return found


def smoke_argv(out) -> list[str]:
    # An exports folder without models: the harness exports its random models itself.
    return [
        "--smoke",
        "--out",
        str(out),
        "--exports",
        str(out / "no_exports"),
        "--publish",
        str(out / "docs" / "perf.md"),
    ]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if importlib.util.find_spec("captum") is None:
        pytest.fail(
            "captum is not installed: the benchmark's built-in-handler contestants need "
            "it (requirements-bench.txt; make test installs it)",
            pytrace=False,
        )
    shared_photo("dog_labrador.jpg")  # the dog app's dog photos
    out = tmp_path_factory.mktemp("bench")
    bench_main(smoke_argv(out))
    return out


def test_smoke_run_writes_complete_results(smoke):
    results = json.loads((smoke / "results.json").read_text())
    assert results["smoke"] is True
    assert set(results["machine"]) >= {"cpu", "cores", "torch", "date"}
    assert results["environment"] == {
        "MALLOC_MMAP_THRESHOLD_": "17179869184",
        "MALLOC_TRIM_THRESHOLD_": "17179869184",
    }
    contestants = results["contestants"]
    assert set(contestants) == {"served", "in_process", "builtin", "builtin_default", "flask"}
    assert not any(c.get("skipped") for c in contestants.values()), contestants

    assert list(results["models"]) == ["flying_objects"]
    model = results["models"]["flying_objects"]
    # --device auto: CI has no GPU, so everything ran on the CPU, TorchServe told so too
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert results["settings"]["device"] == want and results["settings"]["client_processes"] >= 1
    assert model["in_process"]["device"].split(":")[0] == want
    config = (smoke / "work" / "ts_flying_objects" / "config.properties").read_text()
    assert f"number_of_gpu={torch.cuda.device_count() if want == 'cuda' else 0}" in config.splitlines()
    assert model["origin"].startswith("random mobilenet_v2")
    assert set(model["cells"]) == {"served", "flask", "builtin", "builtin_default"}
    for key, sizes in model["cells"].items():
        assert list(sizes) == ["500x375"], key
        cells = sizes["500x375"]
        assert [c["concurrency"] for c in cells] == [1, 8], key
        for c in cells:
            assert c["images_per_s"] > 0, (key, c)
            assert c["errors"] == 0, (key, c)
            assert c["measured_requests"] > 0, (key, c)
            lat = c["latency_ms"]
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"], (key, c)
            assert 0 <= c["cpu_steal"] < 1, (key, c)  # Linux has /proc/stat
            cpu = c.get("server_cpu_ms_per_request")
            if key == "flask":
                assert cpu is None, c  # not a TorchServe
            else:  # both found by their command lines, each spent CPU on every request
                assert cpu["frontend"] > 0 and cpu["workers"] > 0, (key, c)
    # TorchServe ran with the settings asked for.
    assert model["server_settings"]["served"] == {
        "batch_size": 8,
        "max_batch_delay_ms": 2,
        "workers": psutil.cpu_count(),
    }
    assert model["startup"]["start_to_ready_s"] > 0
    assert model["startup"]["start_to_first_answer_s"] >= model["startup"]["start_to_ready_s"]

    ip = model["in_process"]
    assert ip["batch_sizes"] == [1, 4]
    assert (ip["processes"], ip["threads"]) == (psutil.cpu_count(), 1)  # as the served workers
    size = ip["sizes"]["500x375"]
    assert size["best_images_per_s"] == max(size["images_per_s_by_batch"]) > 0
    assert size["single_image_latency_ms"]["p50"] > 0
    assert 0 <= ip["cpu_steal"] < 1
    assert 0 <= results["machine"]["cpu_steal"] < 1

    rows = model["ratios"]
    assert [(r["size"], r["concurrency"]) for r in rows] == [("500x375", 1), ("500x375", 8)]
    for r in rows:
        assert r["served/in-process"] > 0 and r["served/flask"] > 0
        assert r["served/built-in"] > 0 and r["served/out-of-box"] > 0
    # Lone requests: each paired with the worker's HandlerTime for it.
    assert set(model["lone"]) == {"served", "builtin"}
    for key, sizes in model["lone"].items():
        lone = sizes["500x375"]
        assert 0 < lone["requests"] <= 5, key
        assert 0 < lone["handler_ms"] < lone["client_ms"], key
        # medians of the differences, not the difference of medians: only close
        assert 0 < lone["outside_ms"] < lone["client_ms"], key
    # The served lone requests were paired with in-process timings of the same minutes.
    served = model["lone"]["served"]["500x375"]
    assert served["in_process_ms"] > 0
    # Three roundings to 0.01 ms (the two medians and their difference), whatever the speed.
    assert served["client_minus_in_process_ms"] == pytest.approx(
        served["client_ms"] - served["in_process_ms"], abs=3 * 0.005 + FLOAT_ROUNDING
    )
    assert all("in_process_ms" not in d for d in model["lone"].get("builtin", {}).values())

    pre = results["preprocessing"]["500x375"]
    assert pre["plain_ms"] > 0 and pre["handler_ms"] > 0
    # The report rounds each median to 0.01 ms and the ratio of the unrounded medians to
    # 0.001: recomputed from the rounded medians, the ratio may differ by the ratio times
    # each median's relative rounding, plus the ratio's own. On a fast machine the medians
    # are small and their rounding weighs more: the tolerance follows them.
    ms_rounding, ratio_rounding = 0.005, 0.0005
    tolerance = (
        pre["ratio"] * (ms_rounding / pre["handler_ms"] + ms_rounding / pre["plain_ms"]) + ratio_rounding
    )
    assert pre["ratio"] == pytest.approx(pre["handler_ms"] / pre["plain_ms"], abs=tolerance)
    # a 500x375 photo is too small to be decoded reduced: one grey level at most (serve()'s
    # one-pass resampling), in a few values
    assert pre["max_abs_diff"] <= ONE_GREY_LEVEL + FLOAT_ROUNDING and pre["mean_abs_diff"] < 1e-3

    md = (smoke / "results.md").read_text()
    assert "Smoke run" in md
    # The tables hold the results' own figures, each in its column (written out here, not
    # with report's row builders, which wrote them).
    assert has_row(
        md,
        "500x375",
        pre["plain_ms"],
        pre["handler_ms"],
        pre["ratio"],
        pre["max_abs_diff"],
        pre["mean_abs_diff"],
    )
    for key, sizes in model["cells"].items():
        for c in sizes["500x375"]:
            lat = c["latency_ms"]
            assert has_row(
                md,
                key,
                "500x375",
                c["concurrency"],
                c["images_per_s"],
                lat["p50"],
                lat["p90"],
                lat["p99"],
                c["measured_requests"],
                c["errors"],
                report.percent(c["cpu_steal"]),
                *[
                    shown(c["server_cpu_ms_per_request"][part]) if key != "flask" else "–"
                    for part in ("frontend", "workers")
                ],
            ), (key, c)
    for key, sizes in model["lone"].items():
        d = sizes["500x375"]
        assert has_row(md, key, "500x375", d["client_ms"], d["handler_ms"], d["outside_ms"], d["requests"]), (
            key,
            d,
        )
    assert f"CPU steal during the run {report.percent(results['machine']['cpu_steal'])}" in md
    row = report.summary_rows(results)[0]
    assert row["app"] == "flying_objects" and row["photos"] == "generated 500x375 JPEGs"
    assert row["served img/s, c=8"] == model["cells"]["served"]["500x375"][1]["images_per_s"]
    assert row["served ÷ in-process"] == rows[1]["served/in-process"]


def test_smoke_run_measures_the_dog_app(smoke):
    """The dog app under its own handler, served and in-process on the same photos, taking
    turns; each photo took the path it takes when deployed (the detector is real)."""
    results = json.loads((smoke / "results.json").read_text())
    dog = results["dog_app"]
    assert dog["origin"] == (
        "random resnet50, 133 classes, beside the pretrained efficientnet_lite0 dog detector"
    )
    assert dog["model_config"]["handler"]["name"] == "dog_breeds"
    assert dog["server_settings"] == {"batch_size": 8, "max_batch_delay_ms": 2, "workers": psutil.cpu_count()}
    config = (smoke / "work" / "dog_app" / "ts" / "config.properties").read_text()
    assert "load_models=dog_breeds.mar" in config.splitlines()
    groups = dog["groups"]
    assert list(groups) == ["dog photos", "non-dog photos"] and "dog photos" not in dog["missing"]
    want = {"dog_labrador": "dog", "astronaut": "human", "grace_hopper": "human", "coffee": "none"}
    for name, g in groups.items():
        assert [c["concurrency"] for c in g["cells"]] == [8], name  # the smoke run's highest
        assert all(c["errors"] == 0 and c["images_per_s"] > 0 for c in g["cells"]), name
        assert len(g["in_process"]) == 1 and g["in_process"][0]["batch_sizes"] == [1, 4], name
        assert g["served_images_per_s"] == g["cells"][0]["images_per_s"]
        assert g["in_process_images_per_s"] == g["in_process"][0]["sizes"][name]["best_images_per_s"]
        # The ratio of the two stored rates, rounded to 0.001, whatever the speed.
        assert g["served/in-process"] == pytest.approx(
            g["served_images_per_s"] / g["in_process_images_per_s"], abs=0.0005 + FLOAT_ROUNDING
        )
        assert set(g["order"]) == {"served", "in_process"} and len(g["order"]) == 2
        assert g["answers"] == {p: {"served": want[p], "in_process": want[p]} for p in g["photos"]}
        assert list(g["face_check_ms"]) == g["photos"] and all(v > 0 for v in g["face_check_ms"].values())
        # The mean of the stored (rounded) figures, itself rounded to 0.01 ms.
        assert g["face_check_ms_mean"] == pytest.approx(
            sum(g["face_check_ms"].values()) / len(g["photos"]), abs=0.005 + FLOAT_ROUNDING
        )
    assert groups["non-dog photos"]["photos"] == ["astronaut", "grace_hopper", "coffee"]
    # the sets took turns in opposite orders
    assert groups["dog photos"]["order"] != groups["non-dog photos"]["order"]
    md = (smoke / "results.md").read_text()
    dog_rows = [r for r in report.summary_rows(results) if r["handler"] == "dog_breeds"]
    assert [r["photos"].split(":")[0] for r in dog_rows] == list(groups)
    for name, g in groups.items():
        for photo in g["photos"]:
            assert has_row(md, photo, name, want[photo], want[photo], g["face_check_ms"][photo])
    row = "| dog app (dog_breeds, fp32) | dog_breeds | non-dog photos: astronaut, grace_hopper, coffee |"
    assert row in md


def test_report_header_names_the_date_machine_and_command(smoke):
    results = json.loads((smoke / "results.json").read_text())
    m = results["machine"]
    if shutil.which("lscpu"):
        assert m["cpu"] == report.lscpu_model()
    assert results["command"].endswith(" -m bench.run " + shlex.join(smoke_argv(smoke)))
    lines = (smoke / "results.md").read_text().splitlines()
    assert lines[2] == f"- Date: {m['date']}"
    gpus = ", ".join(m["gpus"]) or "no GPU"
    assert lines[3].startswith(f"- Machine: {m['cpu']}, {m['cores']} cores, {gpus}; ")
    assert lines[4] == f"- Command: `{results['command']}`"


def test_publish_writes_the_same_markdown_with_its_chart_beside_it(smoke):
    published = (smoke / "docs" / "perf.md").read_text()
    assert "](perf.png)" in published
    assert published.replace("](perf.png)", f"]({report.CHART})") == (smoke / "results.md").read_text()
    assert (smoke / "docs" / "perf.png").read_bytes() == (smoke / report.CHART).read_bytes()


def test_table_turns_rows_into_markdown():
    rows = [
        {"app": "dogs", "img/s": 21.53, "ratio": 0.8531, "errors": 0},
        {"app": "cats", "img/s": 1234.4, "ratio": None, "errors": 2, "note": "slow | odd"},
    ]
    assert report.table(rows) == "\n".join(
        [
            "| app | img/s | ratio | errors | note |",
            "|---|---:|---:|---:|---|",
            "| dogs | 21.5 | 0.853 | 0 | – |",
            "| cats | 1234 | – | 2 | slow \\| odd |",
        ]
    )
    assert report.table([]) == ""


def test_bf16_table_compares_each_dog_app_with_its_own_fp32():
    """Two dog apps in two precisions: each app's bf16 row divides by that app's fp32 figures."""

    def app(name, precision, served, in_process):
        group = {
            "photos": ["dog_labrador"],
            "served_images_per_s": served,
            "in_process_images_per_s": in_process,
            "served/in-process": report.ratio(served, in_process),
            "face_check_ms_mean": 1.0,
        }
        return {"name": name, "precision": precision, "groups": {"dog photos": group}}

    results = {"settings": {"concurrency": [1, 32]}, "models": {}}
    for name, precision, served, ip in [
        ("dog_breeds", "fp32", 10.0, 12.0),
        ("dog_breeds", "bf16", 40.0, 44.0),
        ("imagenet_dogs", "fp32", 50.0, 60.0),
        ("imagenet_dogs", "bf16", 80.0, 90.0),
    ]:
        results[report.dog_app_key(name, precision)] = app(name, precision, served, ip)
    assert sorted(k for k in results if k.startswith("dog_app")) == [
        "dog_app",
        "dog_app_bf16",
        "dog_app_imagenet_dogs",
        "dog_app_imagenet_dogs_bf16",
    ]
    rows = report.precision_rows(results)
    assert [(r["app"], r["served fp32 img/s, c=32"], r["served bf16"]) for r in rows] == [
        ("dog app (dog_breeds)", 10.0, 40.0),
        ("dog app (imagenet_dogs)", 50.0, 80.0),
    ]
    assert [r["served bf16 ÷ fp32"] for r in rows] == [4.0, 1.6]
    assert [r["in-process bf16 ÷ fp32"] for r in rows] == [report.ratio(44.0, 12.0), 1.5]
    summary = [r["app"] for r in report.summary_rows(results)]
    assert summary == [f"dog app ({n}, {p})" for n in report.DOG_APPS for p in ("fp32", "bf16")]


def test_dog_photo_sets_name_what_is_missing(tmp_path):
    found = {"astronaut": tmp_path / "a.png", "coffee": tmp_path / "c.png", "chelsea": tmp_path / "x.png"}
    sets, missing = dog_app.photo_sets(found)
    assert sets == {"non-dog photos": {"astronaut": found["astronaut"], "coffee": found["coffee"]}}
    assert list(missing) == ["dog photos"] and "dog_labrador" in missing["dog photos"]


def test_single_image_timer_times_the_handler_and_fails_loudly(smoke, tmp_path):
    """The in-process side of the paired concurrency-1 timings: a process that runs the
    handler on request, and that fails rather than time an image the handler refused."""
    export = smoke / "work" / "exports" / "flying_objects"
    image = next((smoke / "images").glob("*500x375*.jpg"))
    env = harness.child_env(1)
    with inprocess.SingleImageTimer(export, 1, {"500x375": [image]}, env, bench_run.ROOT) as timer:
        ms = [timer.ms("500x375", i) for i in range(3)]
        assert all(0 < m < 60_000 for m in ms)
        assert len(set(ms)) > 1  # measured each time, not a stored value
        with pytest.raises(RuntimeError, match="ended"):
            timer.ms("4000x3000", 0)  # a size it was not given
    assert timer.proc.returncode not in (None, 0)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(RuntimeError, match="did not start"):
        inprocess.SingleImageTimer(export, 1, {"500x375": [bad]}, env, bench_run.ROOT)


def test_inprocess_limit_runs_on_the_gpu_it_is_given_or_the_cpu(smoke, tmp_path):
    """--gpu N gives the handler GPU N as TorchServe gives a worker its gpu_id; where torch
    has no CUDA the handler stays on the CPU, as a worker does."""
    image = next((smoke / "images").glob("*.jpg"))
    out = tmp_path / "ip.json"
    inprocess.main(
        [
            "--export",
            str(smoke / "work" / "exports" / "flying_objects"),
            "--threads",
            "1",
            "--images",
            f"500x375={image}",
            "--batch-sizes",
            "2",
            "--seconds",
            "0",
            "--min-batches",
            "1",
            "--gpu",
            "0",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert result["sizes"]["500x375"][0]["images"] == 2


def test_chart_draws_every_contestant_and_the_in_process_limit(smoke, tmp_path):
    """throughput.png is written beside results.md, which shows it; each panel's lines are
    the cells' images/s by concurrency, the dashed line the in-process best."""
    from PIL import Image

    with Image.open(smoke / report.CHART) as png:
        assert png.width >= 500 and png.height >= 300
    assert "](throughput.png)" in (smoke / "results.md").read_text()
    results = json.loads((smoke / "results.json").read_text())
    fig = chart.plot(results, tmp_path / "t.png")
    model = results["models"]["flying_objects"]
    ax = fig.axes[0]
    lines = {line.get_gid(): line for line in ax.get_lines()}
    assert set(lines) == set(model["cells"]) | {"in_process"}
    for key, sizes in model["cells"].items():
        cells = sizes["500x375"]
        assert list(lines[key].get_xdata()) == [c["concurrency"] for c in cells]
        assert list(lines[key].get_ydata()) == [c["images_per_s"] for c in cells]
    best = model["in_process"]["sizes"]["500x375"]["best_images_per_s"]
    assert list(lines["in_process"].get_ydata()) == [best, best]
    assert "flying_objects, 500×375" in ax.get_title()


def test_smoke_run_leaves_no_server_behind(smoke):
    assert _bench_processes(smoke) == []


def test_builtin_contestants_are_skipped_without_captum(smoke, tmp_path, monkeypatch):
    """Where captum is missing (CI installs requirements.txt only), the built-in handler's
    contestants are reported as skipped, with the reason, and the rest still runs. The
    in-process figure tries batch 2 only: no single-image latency, which the report shows as –."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        bench_run.importlib.util, "find_spec", lambda name, *a: None if name == "captum" else real(name, *a)
    )
    # The smoke run's export folder serves as "trained" exports: no new export needed.
    bench_main(
        [
            "--smoke",
            "--contestants",
            "builtin",
            "builtin_default",
            "--out",
            str(tmp_path),
            "--exports",
            str(smoke / "work" / "exports"),
            "--inprocess-batch-sizes",
            "2",
            "--no-dog-app",
        ]
    )
    results = json.loads((tmp_path / "results.json").read_text())
    for k in ("builtin", "builtin_default"):
        assert results["contestants"][k]["skipped"].startswith("captum is not installed")
    for k in ("served", "flask"):
        assert results["contestants"][k]["skipped"] == "not selected (--contestants)"
    model = results["models"]["flying_objects"]
    assert model["cells"] == {} and model["ratios"] == []
    assert model["in_process"]["sizes"]["500x375"]["best_images_per_s"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "skipped: captum is not installed" in md
    assert "| photos | batch 2 img/s | best img/s | best batch | 1-image p50 ms |" in md
    assert "| 2 | – |" in md  # best batch 2, no single-image latency
    assert "dog_app" not in results


@pytest.mark.slow
def test_flops_measures_each_compilation_against_a_matrix_multiply(tmp_path, capsys):
    from torch.utils.flop_counter import FlopCounterMode

    from bench import flops
    from models.zoo import get_model

    results = flops.main(
        [
            "--models",
            "flying_objects",
            "--exports",
            str(tmp_path / "none"),
            "--batch-sizes",
            "1",
            "2",
            "--rounds",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    fly = results["models"]["flying_objects"]
    assert fly["origin"].startswith("random mobilenet_v2")
    assert [(r["optimize"], r["batch"]) for r in fly["rows"]] == [
        (mode, b) for mode in flops.MODES for b in (1, 2)
    ]
    # The FLOPs counted on the TorchScript file are the eager network's.
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        get_model("mobilenet_v2", 4, weights=None).eval()(torch.zeros(1, 3, 224, 224))
    for r in fly["rows"]:
        assert math.isclose(r["gflop_per_image"], counter.get_total_flops() / 1e9, rel_tol=1e-9), r
    assert fly["matmul_gflops"] > 0
    for r in fly["rows"]:
        rate = r["gflop_per_image"] / r["ms_per_image"] * 1e3
        assert math.isclose(r["gflops"], rate, rel_tol=1e-9), r
        assert math.isclose(r["of_matmul"], r["gflops"] / fly["matmul_gflops"], rel_tol=1e-9), r
    assert json.loads((tmp_path / "flops.json").read_text()) == results
    assert "of matmul" in capsys.readouterr().out
