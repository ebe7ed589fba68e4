"""Call TorchServe's inference and management APIs with token authorization.

    python -m serving.client predict --model dog_breeds image.jpg [more.jpg ...]
    python -m serving.client register --model-store model_store [--batch-size 8 ...]
    python -m serving.client models
    python -m serving.client wait

Keys come from the key_file.json that TorchServe writes in the folder it was
started in (``run/`` under ``make serve``). Inference and management keys expire
(token_expiration_min in config.properties); when the server refuses one as
expired or invalid, the client asks the management API's token endpoint for a
new one with the API key, which does not expire, and retries once.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import threading
import time
from pathlib import Path

import requests

from serving.archive import ArchiveMismatch, verify_archive
from serving.logs import LoadWatch, ModelLoadError

DEFAULT_KEY_FILE = os.environ.get("TS_KEY_FILE", "run/key_file.json")
KEY_FILE_WAIT_S = 5.0  # how long to wait for TorchServe to finish rewriting its key file


class TorchServeError(RuntimeError):
    """TorchServe answered with an error status; carries the status and the JSON body."""

    def __init__(self, status: int, body):
        self.status, self.body = status, body
        msg = body.get("message", body) if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {msg}")


def _body(r: requests.Response):
    try:
        return r.json()
    except ValueError:
        return r.text


def _answer(r: requests.Response):
    """An inference API's answer: its JSON, or TorchServeError for a 4xx/5xx."""
    if r.status_code >= 400:
        raise TorchServeError(r.status_code, _body(r))
    return r.json()


def _refused_key(r: requests.Response) -> bool:
    # TorchServe 0.12 refuses a missing, wrong or expired key with 400 InvalidKeyException.
    body = _body(r)
    return r.status_code == 400 and isinstance(body, dict) and body.get("type") == "InvalidKeyException"


class Client:
    """A small client for one TorchServe instance."""

    def __init__(
        self,
        inference_url="http://127.0.0.1:8080",
        management_url="http://127.0.0.1:8081",
        key_file: str | Path | None = DEFAULT_KEY_FILE,
        timeout: float = 60.0,
        metrics_url="http://127.0.0.1:8082",
    ):
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.metrics_url = metrics_url.rstrip("/")
        self.key_file = Path(key_file) if key_file else None
        self.timeout = timeout
        self.session = requests.Session()
        self._refresh_lock = threading.Lock()

    # -- keys --------------------------------------------------------------
    def keys(self) -> dict:
        """{'management': ..., 'inference': ..., 'API': ...} from the server's key file."""
        if self.key_file is None:
            return {}
        deadline = time.monotonic() + KEY_FILE_WAIT_S
        while True:
            try:
                data = json.loads(self.key_file.read_text())
                return {kind: v["key"] for kind, v in data.items()}
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{self.key_file} not found: is TorchServe running (make serve)? It writes "
                    "its key file in the folder it starts in"
                ) from None
            except (ValueError, KeyError, TypeError, AttributeError):
                # TorchServe rewrites the file in place when it issues keys: a read can
                # see it empty or half written. Wait for the write to finish.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def refresh_key(self, kind: str) -> str:
        """Have the server issue a new ``kind`` key (inference or management) and return it.

        TorchServe 0.12's token endpoint answers with an empty body and rewrites
        its key file, so the new key is read back from the file.
        """
        before = self.keys()
        r = self.session.get(
            f"{self.management_url}/token",
            params={"type": kind},
            headers={"Authorization": f"Bearer {before['API']}"},
            timeout=self.timeout,
        )
        if r.status_code != 200:
            raise TorchServeError(r.status_code, _body(r))
        deadline = time.monotonic() + KEY_FILE_WAIT_S
        while (key := self.keys()[kind]) == before[kind] and time.monotonic() < deadline:
            time.sleep(0.02)
        return key

    def _replacement_key(self, kind: str, refused: str) -> str:
        """A key to use instead of ``refused``: one another thread already fetched, or a new one.

        Each refresh invalidates the previous key, so threads that all saw the same
        expired key must not each refresh it.
        """
        with self._refresh_lock:
            current = self.keys()[kind]
            return current if current != refused else self.refresh_key(kind)

    def _request(self, kind: str, method: str, path: str, **kw) -> requests.Response:
        base = self.inference_url if kind == "inference" else self.management_url
        kw.setdefault("timeout", self.timeout)
        keys = self.keys()
        headers = dict(kw.pop("headers", {}))
        if kind in keys:
            headers["Authorization"] = f"Bearer {keys[kind]}"
        r = self.session.request(method, base + path, headers=headers, **kw)
        if kind in keys and _refused_key(r):
            headers["Authorization"] = f"Bearer {self._replacement_key(kind, keys[kind])}"
            r = self.session.request(method, base + path, headers=headers, **kw)
        return r

    def _json(self, kind: str, method: str, path: str, **kw):
        r = self._request(kind, method, path, **kw)
        if r.status_code >= 400:
            raise TorchServeError(r.status_code, _body(r))
        return _body(r)

    # -- inference ---------------------------------------------------------
    def ping(self) -> dict:
        return self._json("inference", "GET", "/ping")

    def predict_response(
        self, model: str, image: bytes, multipart: bool = False, api: str = "predictions", headers=None
    ) -> requests.Response:
        """POST one image to /<api>/<model> (predictions or explanations); the raw response
        (status, headers, JSON body)."""
        path, headers = f"/{api}/{model}", headers or {}
        if multipart:
            return self._request("inference", "POST", path, files={"data": ("image", image)}, headers=headers)
        return self._request("inference", "POST", path, data=image, headers=headers)

    def explain_response(
        self, model: str, image: bytes, target: str | int | None = None, overlay: bool = False
    ) -> requests.Response:
        """POST one image to /explanations/<model>: the answer with the map of its class, or
        of ``target`` (a label or an index), with a PNG overlay when ``overlay``; both go as
        X-Explain- headers (docs/serving.md)."""
        headers = {"X-Explain-Overlay": "true"} if overlay else {}
        if target is not None:
            headers["X-Explain-Target"] = str(target)
        return self.predict_response(model, image, api="explanations", headers=headers)

    def explain(
        self, model: str, image: bytes, target: str | int | None = None, overlay: bool = False
    ) -> dict:
        """The explained answer for one image; TorchServeError on a 4xx/5xx answer."""
        return _answer(self.explain_response(model, image, target, overlay))

    def predict(self, model: str, image: bytes, multipart: bool = False) -> dict:
        """Top-k answer for one image; TorchServeError on a 4xx/5xx answer."""
        return _answer(self.predict_response(model, image, multipart))

    # -- metrics -----------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """The metrics API's Prometheus samples: {'Name{labels}': value}."""
        r = self.session.get(f"{self.metrics_url}/metrics", timeout=self.timeout)
        if r.status_code != 200:
            raise TorchServeError(r.status_code, _body(r))
        samples = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name.replace(",}", "}")] = float(value)
        return samples

    # -- management --------------------------------------------------------
    def models(self) -> list[dict]:
        return self._json("management", "GET", "/models")["models"]

    def describe(self, model: str, version: str = "") -> list[dict]:
        """The default version's description, or ``version``'s ("all": every version)."""
        return self._json("management", "GET", f"/models/{model}" + (f"/{version}" if version else ""))

    def register(
        self,
        mar_name: str,
        batch_size: int | None = None,
        max_batch_delay: int | None = None,
        initial_workers: int | None = None,
        response_timeout: int | None = None,
    ) -> dict:
        """Register an archive of the model store by file name and wait for its workers.

        Settings left None come from the archive's model-config.yaml (workers: minWorkers).
        """
        params = {"url": mar_name, "synchronous": "true"}
        for k, v in (
            ("batch_size", batch_size),
            ("max_batch_delay", max_batch_delay),
            ("initial_workers", initial_workers),
            ("response_timeout", response_timeout),
        ):
            if v is not None:
                params[k] = v
        return self._json("management", "POST", "/models", params=params)

    def unregister(self, model: str, version: str = "") -> dict:
        """Unregister the default version, or ``version``."""
        return self._json("management", "DELETE", f"/models/{model}" + (f"/{version}" if version else ""))

    def set_default(self, model: str, version: str) -> dict:
        """Make ``version`` the one /predictions/<model> serves."""
        return self._json("management", "PUT", f"/models/{model}/{version}/set-default")

    def wait_until_up(self, timeout: float = 120.0, watch: LoadWatch | None = None) -> None:
        """Wait until the server answers /ping and every registered model has all its
        workers READY (models in config.properties' load_models load after /ping answers).
        With ``watch``, raise ModelLoadError as soon as a model's workers keep dying."""
        deadline = time.monotonic() + timeout
        last: Exception | str | None = None
        while time.monotonic() < deadline:
            if watch:
                watch.check()
            try:
                if self.ping().get("status") == "Healthy":
                    waiting = [m["modelName"] for m in self.models() if not self.ready(m["modelName"])]
                    if not waiting:
                        return
                    last = f"workers of {', '.join(waiting)} not READY"
            except (requests.ConnectionError, FileNotFoundError, TorchServeError) as e:
                last = e
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe did not come up within {timeout:.0f}s ({last})")

    def ready(self, model: str) -> bool:
        """Whether ``model`` has at least one worker and all of them are READY."""
        workers = self.describe(model)[0]["workers"]
        return bool(workers) and all(w["status"] == "READY" for w in workers)


def brief(status: int, body) -> str:
    """One line for an answer: the labels with probabilities, or the error."""
    if status == 200 and isinstance(body, dict) and body.get("subject") == "none":
        return f"none: {body['message']}"
    if status == 200 and isinstance(body, dict) and "top_k" in body:
        scores = "  ".join(f"{e['label']} {e['probability']:.3f}" for e in body["top_k"])
        if body.get("subject") == "dog":
            return f"dog, breed {body['breed']}  ({scores})"
        if body.get("subject") == "human":
            return f"human face, resembles {body['resembles']}  ({scores})"
        return scores
    msg = body.get("message", body) if isinstance(body, dict) else body
    return f"HTTP {status}: {msg}"


def brief_explanation(status: int, body) -> str:
    """One line for an explained answer: the class, where its map peaks, or why there is none."""
    e = body.get("explanation") if status == 200 and isinstance(body, dict) else None
    if not e:
        why = body.get("why") if isinstance(body, dict) else None
        return f"nothing to explain: {why}" if why else brief(status, body)
    if not e.get("method"):
        return f"no map: {e['message']}"
    if e["peak"] is None:
        return f"{e['label']} ({e['probability']:.3f}): no part of the photo holds evidence for it"
    x, y = e["peak"]
    left, top, right, bottom = e["box"]
    line = (
        f"{e['label']} ({e['probability']:.3f}): its evidence peaks at x={x:.0f}, y={y:.0f}, in the "
        f"square x {left:.0f}-{right:.0f}, y {top:.0f}-{bottom:.0f} the model saw"
    )
    return line + (f"; overlay {e['overlay']}" if e.get("overlay") else "")


def _print(obj) -> None:
    print(json.dumps(obj, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(description="TorchServe client with token authorization.")
    p.add_argument("--inference-url", default="http://127.0.0.1:8080", help="inference API address")
    p.add_argument("--management-url", default="http://127.0.0.1:8081", help="management API address")
    p.add_argument("--key-file", default=DEFAULT_KEY_FILE, help="TorchServe's key_file.json")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("predict", help="classify image files")
    pr.add_argument("--model", required=True, help="served model name, e.g. dog_breeds")
    pr.add_argument("--multipart", action="store_true", help="send as multipart form field 'data'")
    pr.add_argument("--brief", action="store_true", help="one line per image instead of JSON")
    pr.add_argument("images", nargs="+", type=Path, help="image files")
    ex = sub.add_parser("explain", help="explain the answers for image files (class activation maps)")
    ex.add_argument("--model", required=True, help="served model name, e.g. imagenet_dogs")
    ex.add_argument("--target", help="the class to explain (a label or an index; default: the answer's)")
    ex.add_argument(
        "--overlay", type=Path, metavar="DIR", help="write each image's map over the photo as DIR/<name>.png"
    )
    ex.add_argument("--brief", action="store_true", help="one line per image instead of JSON")
    ex.add_argument("images", nargs="+", type=Path, help="image files")
    rg = sub.add_parser("register", help="register every .mar of a model store")
    rg.add_argument("--model-store", type=Path, default=Path("model_store"), help="folder of .mar files")
    rg.add_argument("--batch-size", type=int, help="override the archive's batchSize")
    rg.add_argument("--max-batch-delay", type=int, help="override the archive's maxBatchDelay (ms)")
    rg.add_argument("--workers", type=int, help="workers per model (default: the archive's minWorkers)")
    rg.add_argument("--only", nargs="+", metavar="NAME", help="register these models of the store only")
    rg.add_argument(
        "--replace",
        action="store_true",
        help="unregister a model already registered and register its archive again",
    )
    sub.add_parser("models", help="list registered models with their workers")
    wt = sub.add_parser("wait", help="wait until the server answers /ping")
    wt.add_argument("--for", dest="wait_s", type=float, default=120.0, help="seconds to wait")
    wt.add_argument(
        "--logs",
        type=Path,
        help="TorchServe's log folder: stop early, with the "
        "cause, when a model's workers keep dying while loading it",
    )
    a = p.parse_args(argv)
    c = Client(a.inference_url, a.management_url, a.key_file, a.timeout)
    try:
        if a.cmd == "predict":
            failed = 0
            for img in a.images:
                r = c.predict_response(a.model, img.read_bytes(), a.multipart)
                if a.brief:
                    print(f"{img} -> {brief(r.status_code, _body(r))}")
                else:
                    print(f"{img} -> HTTP {r.status_code}")
                    _print(_body(r))
                failed += r.status_code >= 400
            sys.exit(1 if failed else 0)
        elif a.cmd == "explain":
            failed = 0
            for img in a.images:
                r = c.explain_response(a.model, img.read_bytes(), a.target, a.overlay is not None)
                body = _body(r)
                explained = body.get("explanation") if isinstance(body, dict) else None
                if explained and explained.get("overlay"):
                    a.overlay.mkdir(parents=True, exist_ok=True)
                    (a.overlay / f"{img.stem}.png").write_bytes(base64.b64decode(explained.pop("overlay")))
                    explained["overlay"] = str(a.overlay / f"{img.stem}.png")
                if a.brief:
                    print(f"{img} -> {brief_explanation(r.status_code, body)}")
                else:
                    print(f"{img} -> HTTP {r.status_code}")
                    _print(body)
                failed += r.status_code >= 400
            sys.exit(1 if failed else 0)
        elif a.cmd == "register":
            mars = [m for m in sorted(a.model_store.glob("*.mar")) if not a.only or m.stem in a.only]
            if not mars:
                sys.exit(f"no .mar files in {a.model_store}/ to register: run make archive first")
            registered = {m["modelName"] for m in c.models()}
            for mar in mars:
                if mar.stem in registered and not a.replace:
                    print(f"{mar.stem}: already registered")
                    continue
                verify_archive(mar)
                if mar.stem in registered:
                    c.unregister(mar.stem)
                    print(f"{mar.stem}: unregistered, to register its new archive")
                print(
                    f"{mar.stem}: "
                    f"{c.register(mar.name, a.batch_size, a.max_batch_delay, a.workers)['status']}"
                )
        elif a.cmd == "models":
            _print([c.describe(m["modelName"])[0] for m in c.models()])
        elif a.cmd == "wait":
            c.wait_until_up(a.wait_s, LoadWatch(a.logs) if a.logs else None)
            print("TorchServe is up")
    except (
        TorchServeError,
        ArchiveMismatch,
        FileNotFoundError,
        TimeoutError,
        ModelLoadError,
        requests.ConnectionError,
    ) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
