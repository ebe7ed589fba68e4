"""TorchServe handler for the exported image classifiers.

Accepts an image as the raw request body or as a multipart/form-data file field,
applies the eval preprocessing that training used (parameters from the archive's
model-config.yaml ``handler:`` section), runs the whole batch in one forward call
and answers each request with JSON:

    {"top_k": [{"label": "circle", "index": 0, "probability": 0.97}, ...]}

A request that holds no decodable image gets HTTP 400 with
``{"code": 400, "type": "BadImage", "message": "..."}``; the other requests of its
batch are answered as if it were not there. Every response carries the header
``X-Batch-Size``: the number of images in the forward call that served it.

Under TorchServe's KServe envelopes (service_envelope=kserve or kservev2) the
image arrives base64-encoded in a string, and one request may carry several
instances: each gets its answer or its error in the envelope's response.
With kservev2, answers are JSON strings (the protocol's BYTES datatype).

Metrics (declared in serving/metrics.yaml, exported on /metrics in prometheus
mode): ImagesServed, ImagesRejected{Reason}, DecodeTime (ms per batch) and
BatchSize (images per forward call).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import time

import torch
from PIL import Image
from ts.metrics.dimension import Dimension
from ts.metrics.metric_cache_errors import (MetricsCacheKeyError, MetricsCacheTypeError,
                                           MetricsCacheValueError)
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from models.presets import BadImage, EvalPreset, open_image

logger = logging.getLogger(__name__)

# Multipart field names tried first; any single file field is accepted too.
IMAGE_FIELDS = ("data", "body", "file", "image")


def request_image(row: dict) -> tuple[str, bytes]:
    """(where, bytes) of the image in one request row, or BadImage saying what was sent instead.

    ``where`` names the part for error messages: "the request body" or "form field 'x'".
    """
    name = next((k for k in IMAGE_FIELDS if row.get(k) is not None), None)
    if name is None:
        files = [k for k, v in row.items() if isinstance(v, (bytes, bytearray))]
        if len(files) > 1:
            raise BadImage(f"{len(files)} files in one request; send one image per request",
                           "several_files")
        if not files:
            raise BadImage("no image in the request: send it as the body or as a "
                           "multipart file field named 'data'", "no_image")
        name = files[0]
    value = row[name]
    where = "the request body" if name == "body" else f"form field '{name}'"
    if isinstance(value, (dict, list)):
        raise BadImage(f"expected image bytes in {where}, got JSON", "json")
    if isinstance(value, str):
        # KServe's protocols, and JSON clients generally, send images base64-encoded.
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadImage(f"expected image bytes or base64 in {where}, got text", "text") from None
    if not value:
        raise BadImage(f"{where} is empty", "empty")
    return where, bytes(value)


def decode(row: dict) -> Image.Image:
    """The request's image, upright RGB; BadImage names the part and the problem."""
    where, data = request_image(row)
    try:
        return open_image(data)
    except BadImage as e:
        raise BadImage(f"{where}: {e}", e.reason) from None


# name -> (unit, type), as declared in serving/metrics.yaml.
METRICS = {"ImagesServed": ("Count", MetricTypes.COUNTER),
           "ImagesRejected": ("Count", MetricTypes.COUNTER),
           "DecodeTime": ("ms", MetricTypes.GAUGE),
           "BatchSize": ("Count", MetricTypes.GAUGE)}


def error_answer(reason: str) -> dict:
    return {"code": 400, "type": "BadImage", "message": reason}


class ImageClassifier(BaseHandler):
    """Top-k image classification with per-request errors inside a batch."""

    def initialize(self, context):
        super().initialize(context)
        # model-config.yaml's handler: section; subclasses read their settings from it too.
        self.handler_config = cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        self.preset = EvalPreset.from_dict(cfg)
        self.transform = self.preset.transform()
        self.top_k = min(int(cfg.get("top_k", 5)), len(self.mapping))
        logger.info("preprocessing %s, top_k %d", self.preset, self.top_k)

    def _metric(self, name: str, value: float, reason: str | None = None) -> None:
        """Update a metric declared in serving/metrics.yaml, dimensions in its order."""
        if getattr(self.context, "metrics", None) is None:
            return  # called outside a worker (a test or a benchmark of preprocess alone)
        unit, kind = METRICS[name]
        dims = [Dimension("ModelName", self.context.model_name), Dimension("Level", "Model")]
        if reason is not None:
            dims.append(Dimension("Reason", reason))
        try:
            self.context.metrics.add_metric(name, value, unit, None, dims, kind)
        except (MetricsCacheKeyError, MetricsCacheTypeError, MetricsCacheValueError) as e:
            # e.g. another metrics config: never fail a request over a metric
            logger.warning("metric %s not updated: %s", name, e)

    def inspect(self, image: Image.Image):
        """Per-image facts gathered while the decoded image is at hand (subclasses)."""
        return None

    def answer(self, top_k: list[dict], probs: torch.Tensor, aux: torch.Tensor | None, facts) -> dict:
        """The JSON answer for one good image. ``aux`` is the model's second output, if any."""
        return {"top_k": top_k}

    def preprocess(self, data):
        """Decode and transform each request; returns (batch, {row: reason}, rows, facts)."""
        start = time.perf_counter()
        tensors, errors, facts = [], {}, []
        for i, row in enumerate(data):
            try:
                image = decode(row)
                tensors.append(self.transform(image))
                facts.append(self.inspect(image))
            except BadImage as e:
                errors[i] = str(e)
                self._metric("ImagesRejected", 1, e.reason)
        self._metric("DecodeTime", round(1000 * (time.perf_counter() - start), 3))
        batch = torch.stack(tensors) if tensors else None
        return batch, errors, len(data), facts

    def inference(self, data, *args, **kwargs):
        batch, errors, n, facts = data
        probs = aux = None
        if batch is not None:
            self._metric("BatchSize", len(batch))
            with torch.inference_mode():
                out = self.model(batch.to(self.device))
            # A model may return (class logits, auxiliary logits), e.g. an ImageNet head.
            logits, aux = (out[0], out[1].cpu()) if isinstance(out, (tuple, list)) else (out, None)
            probs = logits.softmax(dim=1).cpu()
            self._metric("ImagesServed", len(batch))
        return probs, aux, errors, n, facts

    def postprocess(self, data):
        probs, aux, errors, n, facts = data
        top = probs.topk(self.top_k, dim=1) if probs is not None else None
        answers, j = [], 0
        for i in range(n):
            if i in errors:
                answers.append(error_answer(errors[i]))
                continue
            top_k = [{"label": self.mapping[str(k)], "index": k, "probability": round(p, 6)}
                     for p, k in zip(top.values[j].tolist(), top.indices[j].tolist())]
            answers.append(self.answer(top_k, probs[j], None if aux is None else aux[j], facts[j]))
            j += 1
        self._report_status(n, errors)
        if getattr(self.context, "input_names", None):  # kservev2 envelope: BYTES are strings
            answers = [json.dumps(a) for a in answers]
        return answers

    def _report_status(self, n: int, errors: dict) -> None:
        """Per-request status and X-Batch-Size header.

        Normally row i is request i. Under a KServe envelope one request may carry
        several instances: its status is 400 only if all of them failed.
        """
        requests = len(self.context.request_processor or [])
        batch_size = str(n - len(errors))
        if requests == n:
            for i in range(n):
                self.context.set_response_header(i, "X-Batch-Size", batch_size)
                if i in errors:
                    self.context.set_response_status(400, "Bad Request", i)
        elif requests:
            self.context.set_response_header(0, "X-Batch-Size", batch_size)
            if n and len(errors) == n:
                self.context.set_response_status(400, "Bad Request", 0)
