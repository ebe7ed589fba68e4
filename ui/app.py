"""A small web app on 127.0.0.1: pick an image, preview it, submit, read the answer;
"Why?" shows where in the photo the answer's evidence lies (TorchServe's explanations API).

    python -m ui.app --port 5000          (make ui)

It calls TorchServe's inference API from the server side with the key from the
server's key file, so the key never reaches the browser. TorchServe's refusals and
timeouts come back as a readable message. A Flask app, as in the original, served by
waitress (Flask's own server is for development only).
"""

from __future__ import annotations

import argparse

import requests
import waitress
from flask import Flask, jsonify, render_template, request

from serving.client import DEFAULT_KEY_FILE, Client, TorchServeError

MAX_UPLOAD = 20 * 2**20  # as TorchServe's max_request_size
# Listed first: the dog-breed model that works out of the box, whatever the demo trained.
FIRST_MODEL = "imagenet_dogs"


def listed(names: list[str]) -> list[str]:
    """The models in the page's order: FIRST_MODEL, then the others by name."""
    return sorted(names, key=lambda name: (name != FIRST_MODEL, name))


def create_app(client: Client) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD

    @app.get("/")
    def index():
        return render_template("index.html")

    @app.get("/api/models")
    def models():
        try:
            return jsonify(listed([m["modelName"] for m in client.models()]))
        except (TorchServeError, requests.RequestException, FileNotFoundError) as e:
            return jsonify(error=f"TorchServe is not reachable: {e}"), 502

    def ask(send):
        """The model's answer to the uploaded image, sent by ``send(model, image)`` (a prediction,
        or an explanation with the map drawn over the photo), or a readable error."""
        model = request.form.get("model", "")
        upload = request.files.get("image")
        if not model:
            return jsonify(error="choose a model"), 400
        if upload is None or not upload.filename:
            return jsonify(error="choose an image file first"), 400
        try:
            r = send(model, upload.read())
        except requests.Timeout:
            return jsonify(error=f"TorchServe did not answer within {client.timeout:.0f} s"), 504
        except (requests.RequestException, FileNotFoundError) as e:
            return jsonify(error=f"TorchServe is not reachable: {e}"), 502
        try:  # TorchServe's 200 answers carry no Content-Type: parse, don't trust the header
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code != 200 or not isinstance(body, dict):
            message = body.get("message") if isinstance(body, dict) else None
            return jsonify(error=f"{model} refused the image: {message or r.text or r.reason}"), (
                r.status_code if r.status_code != 200 else 502
            )
        return jsonify(model=model, answer=body)

    @app.post("/api/predict")
    def predict():
        return ask(client.predict_response)

    @app.post("/api/explain")
    def explain():
        return ask(lambda model, image: client.explain_response(model, image, overlay=True))

    @app.errorhandler(413)
    def too_large(_):
        return jsonify(error=f"the file is over {MAX_UPLOAD // 2**20} MB"), 413

    return app


def main(argv=None):
    p = argparse.ArgumentParser(description="The upload page for the served models.")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1")
    p.add_argument("--inference-url", default="http://127.0.0.1:8080", help="TorchServe inference API")
    p.add_argument("--management-url", default="http://127.0.0.1:8081", help="TorchServe management API")
    p.add_argument("--key-file", default=DEFAULT_KEY_FILE, help="TorchServe's key_file.json")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for TorchServe")
    a = p.parse_args(argv)
    client = Client(a.inference_url, a.management_url, a.key_file, a.timeout)
    print(f"open http://127.0.0.1:{a.port}/")
    waitress.serve(create_app(client), host="127.0.0.1", port=a.port, threads=8)


if __name__ == "__main__":
    main()
