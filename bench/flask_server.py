"""A per-request Flask server, as the original dog app was deployed: one image per call,
PIL decode + the eval transform + a forward call on that one image, no batching.

    python -m bench.flask_server --export build/bench/exports/flying_objects --port 5005

Flask's development server with its defaults (threaded: one thread per connection), torch
with its default thread count unless --threads is given, on the CPU unless --device cuda
(then GPU 0, as every contestant gets on a GPU machine). POST the JPEG as the raw body to
/predictions/<anything>; the answer is {"top_k": [...]} like the project's handler's.
GET /info tells the settings it runs with.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import yaml
from flask import Flask, jsonify, request

from handlers.decode import BadImage, open_image
from handlers.preset import EvalPreset


def load(export: Path, device: str = "cpu"):
    """The TorchScript file as loaded by torch.jit.load on ``device``, the device, and the
    eval transform: no optimisation, no reduced-scale decoding (the original app had
    neither). An int8 model gets its quantized engine, as the other contestants do, and
    stays on the CPU: its kernels are CPU kernels."""
    cfg = yaml.safe_load((export / "model-config.yaml").read_text()).get("handler", {})
    if cfg.get("quantized_engine"):
        torch.backends.quantized.engine = cfg["quantized_engine"]
        device = "cpu"
    model = torch.jit.load(str(export / "model.pt"), map_location=device).eval()
    return model, torch.device(device), EvalPreset.from_dict(cfg).transform()


def create_app(export: Path, device: str = "cpu") -> Flask:
    model, device, transform = load(export, device)
    labels = json.loads((export / "index_to_name.json").read_text())
    top_k = min(5, len(labels))
    app = Flask(__name__)

    @app.post("/predictions/<name>")
    def predict(name):
        try:
            x = transform(open_image(request.get_data())).unsqueeze(0).to(device)
        except BadImage as e:
            return jsonify({"code": 400, "message": str(e)}), 400
        with torch.inference_mode():
            out = model(x)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        p, k = logits.softmax(dim=1).topk(top_k, dim=1)
        return jsonify(
            {
                "top_k": [
                    {"label": labels[str(i)], "index": i, "probability": round(v, 6)}
                    for v, i in zip(p[0].tolist(), k[0].tolist())
                ]
            }
        )

    @app.get("/info")
    def info():
        return jsonify(
            {
                "torch_threads": torch.get_num_threads(),
                "threaded": True,
                "device": str(device),
                "server": "flask development server (werkzeug)",
            }
        )

    return app


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-request Flask server for the benchmark.")
    p.add_argument("--export", type=Path, required=True, help="folder with model.pt, index_to_name.json")
    p.add_argument("--port", type=int, required=True, help="loopback port")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    create_app(a.export, a.device).run("127.0.0.1", a.port, threaded=True)


if __name__ == "__main__":
    main()
