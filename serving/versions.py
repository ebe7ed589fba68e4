"""Roll a model's versions forward and back through the management API.

    python -m serving.versions rollout --model flying_objects --archive flying_objects_v2.0.mar
    python -m serving.versions rollback --model flying_objects --to 1.0
    python -m serving.versions retire --model flying_objects --version 2.0
    python -m serving.versions list --model flying_objects

rollout registers the archive (checked against SHA256SUMS), waits until its workers
are READY and only then makes it the default, so requests to /predictions/<model>
never reach a version that cannot answer. rollback makes an older version the
default again; retire unregisters a version that is not the default, once it has
answered the requests it still holds (``drain``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from serving.archive import ArchiveMismatch, verify_archive
from serving.client import DEFAULT_KEY_FILE, Client, TorchServeError


def versions(client: Client, model: str) -> list[dict]:
    """[{'version': '1.0', 'archive': 'x.mar', 'default': True, 'workers': ['READY']}, ...]

    Describe has no default flag: GET /models lists each model's default version,
    by archive, so the default is the version registered from that archive.
    """
    default_url = next(m["modelUrl"] for m in client.models() if m["modelName"] == model)
    return [
        {
            "version": d["modelVersion"],
            "archive": d["modelUrl"],
            "default": d["modelUrl"] == default_url,
            "batchSize": d["batchSize"],
            "workers": [w["status"] for w in d["workers"]],
        }
        for d in client.describe(model, "all")
    ]


def default_version(client: Client, model: str) -> str:
    return next(v["version"] for v in versions(client, model) if v["default"])


def rollout(client: Client, model: str, mar: Path, workers: int | None = None) -> str:
    """Register ``mar`` as a new version of ``model`` and make it the default; returns the version."""
    verify_archive(mar)
    before = {v["version"] for v in versions(client, model)}
    client.register(mar.name, initial_workers=workers)  # synchronous: workers are up on return
    new = [v for v in versions(client, model) if v["version"] not in before]
    if len(new) != 1:
        raise TorchServeError(409, f"{mar.name} did not add a new version of {model}")
    version = new[0]["version"]
    if not new[0]["workers"] or set(new[0]["workers"]) != {"READY"}:
        raise TorchServeError(503, f"{model} {version} workers not READY: {new[0]['workers']}")
    client.set_default(model, version)
    return version


# What retire waits, beyond the version's batch delay, once its queue is empty: the time
# the batch in its workers takes (ResNet50, batch 8, one thread: under 1 s here).
DRAIN_S = 2.0


def drain(
    client: Client, model: str, version: str, after_s: float = DRAIN_S, timeout_s: float = 120.0
) -> None:
    """Wait until ``version`` has answered the requests it holds. TorchServe 0.12 drops,
    unanswered, the requests a version holds when it is unregistered (its log says
    "Unexpected job in sendError()", and the clients wait out their timeout). Those that
    reached it before it stopped being the default are queued (pendingRequests) or in a
    batch: the queue must empty, then the batch delay and ``after_s`` pass."""
    deadline = time.monotonic() + timeout_s
    while (d := client.describe(model, version)[0])["jobQueueStatus"]["pendingRequests"]:
        if time.monotonic() > deadline:
            raise TorchServeError(
                503, f"{model} {version} still has queued requests after {timeout_s:.0f} s; not retired"
            )
        time.sleep(0.1)
    time.sleep(d["maxBatchDelay"] / 1000 + after_s)


def retire(client: Client, model: str, version: str, drain_s: float = DRAIN_S) -> None:
    if default_version(client, model) == version:
        raise TorchServeError(409, f"{model} {version} is the default: roll back first")
    drain(client, model, version, drain_s)
    client.unregister(model, version)


def main(argv=None):
    p = argparse.ArgumentParser(description="Model versions through the management API.")
    p.add_argument("--inference-url", default="http://127.0.0.1:8080", help="inference API address")
    p.add_argument("--management-url", default="http://127.0.0.1:8081", help="management API address")
    p.add_argument("--key-file", default=DEFAULT_KEY_FILE, help="TorchServe's key_file.json")
    sub = p.add_subparsers(dest="cmd", required=True)
    ro = sub.add_parser("rollout", help="register a new version and make it the default")
    ro.add_argument("--model", required=True, help="model name")
    ro.add_argument("--archive", required=True, type=Path, help="the new version's .mar in the model store")
    ro.add_argument("--workers", type=int, help="workers for the new version (default: its minWorkers)")
    rb = sub.add_parser("rollback", help="make an earlier version the default again")
    rb.add_argument("--model", required=True, help="model name")
    rb.add_argument("--to", required=True, help="version to make the default")
    rt = sub.add_parser("retire", help="unregister a version that is not the default")
    rt.add_argument("--model", required=True, help="model name")
    rt.add_argument("--version", required=True, help="version to unregister")
    rt.add_argument(
        "--drain-s",
        type=float,
        default=DRAIN_S,
        help="seconds to wait, once the version's queue is empty and its batch "
        "delay has passed, for the batch in its workers",
    )
    ls = sub.add_parser("list", help="the model's versions")
    ls.add_argument("--model", required=True, help="model name")
    a = p.parse_args(argv)
    c = Client(a.inference_url, a.management_url, a.key_file)
    try:
        if a.cmd == "rollout":
            print(f"{a.model}: version {rollout(c, a.model, a.archive, a.workers)} is the default")
        elif a.cmd == "rollback":
            c.set_default(a.model, a.to)
            print(f"{a.model}: version {a.to} is the default")
        elif a.cmd == "retire":
            retire(c, a.model, a.version, a.drain_s)
            print(f"{a.model}: version {a.version} unregistered")
        print(json.dumps(versions(c, a.model), indent=2))
    except (TorchServeError, ArchiveMismatch, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
