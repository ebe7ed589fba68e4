"""Start and stop a private TorchServe on loopback: free ports, its own folder.

Used by the tests (and by anything else that needs a throwaway server):

    with LocalServer(model_store, workdir) as client:
        client.register("flying_objects.mar")

The server's key file, logs and PID file live in ``workdir`` (TorchServe keeps its
PID file in $TMPDIR, so each LocalServer gets its own and does not disturb a
server started by ``make serve``). The server is stopped on exit, also when the
body raised, and its process tree is killed if it does not stop by itself.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from serving.client import Client
from serving.logs import LoadWatch, ModelLoadError

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.properties"
# TorchServe's logging without its per-request DEBUG lines (see the file's comment).
LOG_CONFIG = ROOT / "serving" / "log4j2.xml"
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
MALLOC_THRESHOLD = "17179869184"  # 16 GiB, the Makefile's value


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port below the ephemeral range.

    Ports the kernel hands out with bind(0) are ephemeral ones, which outgoing client
    connections also take: under load one was taken before TorchServe bound it (seen).
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(20000, min(low, 32768))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000..32767")


def torchserve_bin() -> str:
    local = Path(sys.executable).parent / "torchserve"
    found = str(local) if local.exists() else shutil.which("torchserve")
    if not found:
        raise FileNotFoundError("torchserve not found: install requirements.txt (make venv)")
    return found


def render_config(base: Path, overrides: dict[str, str]) -> str:
    """The base config.properties with ``overrides`` replacing (or adding) keys."""
    lines, seen = [], set()
    for line in base.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z_][\w.]*)\s*=", line)
        if m and m.group(1) in overrides:
            key = m.group(1)
            line = f"{key}={overrides[key]}"
            seen.add(key)
        lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items() if k not in seen]
    return "\n".join(lines) + "\n"


def read_properties(path: Path) -> dict[str, str]:
    """key -> value of a config.properties file (comments and blank lines skipped)."""
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    )
    return {k.strip(): v.strip() for k, v in pairs}


def absolute_paths(base: Path = CONFIG) -> dict[str, str]:
    """The config's relative paths (model_store, metrics_config) made absolute against ROOT."""
    props = read_properties(base)
    return {k: str((ROOT / props[k]).resolve()) for k in ("model_store", "metrics_config") if k in props}


class LocalServer:
    """A TorchServe instance for one test session or one benchmark."""

    def __init__(
        self,
        model_store: Path,
        workdir: Path,
        overrides: dict[str, str] | None = None,
        base_config: Path = CONFIG,
        start_timeout: float = 120.0,
        log_config: Path | None = LOG_CONFIG,
    ):
        self.model_store = Path(model_store).resolve()
        self.workdir = Path(workdir).resolve()
        self.base_config = base_config
        self.start_timeout = start_timeout
        self.log_config = log_config  # None: TorchServe's own logging
        self.client: Client | None = None
        self._user_overrides = dict(overrides or {})
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.ports = {k: free_port() for k in ("inference", "management", "metrics")}
        self.overrides = {f"{k}_address": f"http://127.0.0.1:{p}" for k, p in self.ports.items()}
        self.overrides["grpc_inference_port"] = str(free_port())
        self.overrides["grpc_management_port"] = str(free_port())
        self.overrides.update(absolute_paths(self.base_config))
        self.overrides["model_store"] = str(self.model_store)
        self.overrides.update(self._user_overrides)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["TMPDIR"] = str(self.workdir / "tmp")
        # As `make serve` does: glibc returns freed memory to the OS too eagerly for
        # PyTorch's pattern of large short-lived tensors (mmap + munmap, page faults on
        # every batch): both thresholds raised. Tests and benchmarks measure the server
        # users get.
        for key in MALLOC_ENV:
            env.setdefault(key, MALLOC_THRESHOLD)
        return env

    def _torchserve(self, *args: str) -> subprocess.CompletedProcess:
        with open(self.workdir / "torchserve.out", "a") as out:
            return subprocess.run(
                [torchserve_bin(), *args],
                cwd=self.workdir,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=60,
            )

    def pid(self) -> int | None:
        f = self.workdir / "tmp" / ".model_server.pid"
        return int(f.read_text().strip()) if f.exists() else None

    def start(self, attempts: int = 3) -> Client:
        """Start the server and wait for it; new ports and another try if a port was taken."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once()
            except TimeoutError:
                out = (self.workdir / "torchserve.out").read_text(errors="replace")
                if attempt == attempts or "Address already in use" not in out:
                    raise
                (self.workdir / "torchserve.out").rename(self.workdir / f"torchserve.{attempt}.out")
                self._pick_ports()
        raise AssertionError("unreachable")

    def _start_once(self) -> Client:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        # A key file left by an earlier server in this folder would be read before the new
        # server writes its own.
        (self.workdir / "key_file.json").unlink(missing_ok=True)
        cfg = self.workdir / "config.properties"
        cfg.write_text(render_config(self.base_config, self.overrides))
        logging = ["--log-config", str(self.log_config)] if self.log_config else []
        watch = LoadWatch(self.workdir / self.env.get("LOG_LOCATION", "logs"))
        self._torchserve(
            "--start", "--ncs", "--ts-config", str(cfg), *logging, "--model-store", str(self.model_store)
        )
        tokens = read_properties(cfg).get("disable_token_authorization", "false") != "true"
        self.client = Client(
            f"http://127.0.0.1:{self.ports['inference']}",
            f"http://127.0.0.1:{self.ports['management']}",
            key_file=self.workdir / "key_file.json" if tokens else None,
            timeout=60,
            metrics_url=f"http://127.0.0.1:{self.ports['metrics']}",
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                self.client.wait_until_up(timeout=2, watch=watch)
                return self.client
            except ModelLoadError:
                self.stop()
                raise
            except TimeoutError as e:
                pid = self.pid()
                died = pid is None or not psutil.pid_exists(pid)
                if died or time.monotonic() > deadline:
                    self.stop()
                    what = "exited at start" if died else "did not come up in time"
                    raise TimeoutError(
                        f"TorchServe {what} ({e}); see {self.workdir}/torchserve.out and logs/"
                    ) from e

    def processes(self) -> list[psutil.Process]:
        """This server's processes: any whose command line names its own config file
        (the PID file alone is not enough: a server that failed half-way through its
        start was seen running on after `torchserve --stop` had discarded the file),
        with their children (the workers)."""
        cfg = str(self.workdir / "config.properties")
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if cfg in (p.info["cmdline"] or []):
                try:
                    found += [p, *p.children(recursive=True)]
                except psutil.NoSuchProcess:
                    pass
        return found

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of the frontend (the Java process) and of the
        model workers alive now (not the frontend's other children, such as its metrics
        collector)."""
        out = {"frontend": 0.0, "workers": 0.0}
        cfg = str(self.workdir / "config.properties")
        for p in self.processes():
            try:
                cmdline = p.cmdline()
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            if cfg in cmdline:
                out["frontend"] += t.user + t.system
            elif any(arg.endswith("model_service_worker.py") for arg in cmdline):
                out["workers"] += t.user + t.system
        return out

    def stop(self) -> None:
        """Stop the server; kill its processes if they have not gone within 30 s."""
        procs = self.processes()
        self._torchserve("--stop")
        _, alive = psutil.wait_procs(procs, timeout=30)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=10)

    def __enter__(self) -> Client:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(
        description="Write the config TorchServe starts with: "
        "config.properties with its relative paths made absolute."
    )
    p.add_argument("--base", type=Path, default=CONFIG, help="config.properties to start from")
    p.add_argument("--out", type=Path, required=True, help="file to write")
    a = p.parse_args(argv)
    a.out.write_text(render_config(a.base, absolute_paths(a.base)))


if __name__ == "__main__":
    main()
