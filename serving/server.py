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
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from serving.client import Client

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.properties"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class LocalServer:
    """A TorchServe instance for one test session or one benchmark."""

    def __init__(self, model_store: Path, workdir: Path, overrides: dict[str, str] | None = None,
                 base_config: Path = CONFIG, start_timeout: float = 120.0):
        self.model_store = Path(model_store).resolve()
        self.workdir = Path(workdir).resolve()
        self.ports = {k: free_port() for k in ("inference", "management", "metrics")}
        self.overrides = {f"{k}_address": f"http://127.0.0.1:{p}" for k, p in self.ports.items()}
        self.overrides["grpc_inference_port"] = str(free_port())
        self.overrides["grpc_management_port"] = str(free_port())
        self.overrides["model_store"] = str(self.model_store)
        self.overrides.update(overrides or {})
        self.base_config = base_config
        self.start_timeout = start_timeout
        self.client: Client | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["TMPDIR"] = str(self.workdir / "tmp")
        return env

    def _torchserve(self, *args: str) -> subprocess.CompletedProcess:
        with open(self.workdir / "torchserve.out", "a") as out:
            return subprocess.run([torchserve_bin(), *args], cwd=self.workdir, env=self.env,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=60)

    def pid(self) -> int | None:
        f = self.workdir / "tmp" / ".model_server.pid"
        return int(f.read_text().strip()) if f.exists() else None

    def start(self) -> Client:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.properties"
        cfg.write_text(render_config(self.base_config, self.overrides))
        self._torchserve("--start", "--ncs", "--ts-config", str(cfg),
                         "--model-store", str(self.model_store))
        self.client = Client(f"http://127.0.0.1:{self.ports['inference']}",
                             f"http://127.0.0.1:{self.ports['management']}",
                             key_file=self.workdir / "key_file.json", timeout=60)
        try:
            self.client.wait_until_up(self.start_timeout)
        except TimeoutError as e:
            self.stop()
            raise TimeoutError(f"{e}; see {self.workdir}/torchserve.out and logs/") from e
        return self.client

    def stop(self) -> None:
        """Stop the server; kill its process tree if it has not gone within 30 s."""
        pid = self.pid()
        procs = []
        if pid and psutil.pid_exists(pid):
            parent = psutil.Process(pid)
            procs = [parent, *parent.children(recursive=True)]
        self._torchserve("--stop")
        _, alive = psutil.wait_procs(procs, timeout=30)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=10)

    def __enter__(self) -> Client:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
