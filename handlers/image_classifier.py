"""TorchServe handler for the exported image classifiers.

Accepts an image as the raw request body or as a multipart/form-data file field,
applies the eval preprocessing that training used (parameters from the archive's
model-config.yaml ``handler:`` section), runs the whole batch in one forward call
and answers each request with JSON:

    {"top_k": [{"label": "circle", "index": 0, "probability": 0.97}, ...]}

A request to /explanations/<model> gets the same answer with an ``explanation``: a class
activation map of the answer's class, or of the one it names (handlers/explain.py). Requests
of both kinds may share a batch; each gets its own kind of answer.

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

Its settings (top_k, threads, jpeg_draft, optimize, onednn_batches, quantized_engine,
half, gpu_decode) are read from the same ``handler:`` section; handlers/settings.py defines
each, with its default and what it does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gc
import io
import json
import logging
import time

import torch
import torchvision
from PIL import Image
from ts.metrics.dimension import Dimension
from ts.metrics.metric_cache_errors import MetricsCacheKeyError, MetricsCacheTypeError, MetricsCacheValueError
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handlers.decode import (
    MAX_PIXELS,
    BadImage,
    Decoded,
    decode_image,
    needs_colour_conversion,
    orient_tensor,
)
from handlers.explain import (
    OVERLAY_PARAM,
    PARAMS,
    TARGET_PARAM,
    Explain,
    explanation,
    has_cam,
    parameter,
    parse_target,
    wants_overlay,
)
from handlers.optimize import RTOL, Method, onednn_sizes, optimize, optimize_mode
from handlers.precision import BF16_METHOD, BF16_RTOL, resolve_precision
from handlers.preset import EvalPreset
from handlers.settings import HandlerSettings

logger = logging.getLogger(__name__)

# Multipart field names tried first; any single file field is accepted too.
IMAGE_FIELDS = ("data", "body", "file", "image")


def request_image(row: dict) -> tuple[str, bytes]:
    """(where, bytes) of the image in one request row, or BadImage saying what was sent instead.

    ``where`` names the part for error messages: "the request body" or "form field 'x'".
    """
    name = next((k for k in IMAGE_FIELDS if row.get(k) is not None), None)
    if name is None:
        # The explanation's parameters may come as form fields: never the image.
        files = [k for k, v in row.items() if isinstance(v, (bytes, bytearray)) and k not in PARAMS]
        if len(files) > 1:
            raise BadImage(f"{len(files)} files in one request; send one image per request", "several_files")
        if not files:
            raise BadImage(
                "no image in the request: send it as the body or as a multipart file field named 'data'",
                "no_image",
            )
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


def decode(row: dict, min_short: int = 0) -> Decoded:
    """The request's image, upright RGB, large JPEGs reduced at decode to ``min_short``
    (handlers.decode.decode_image); BadImage names the part and the problem."""
    where, data = request_image(row)
    try:
        return decode_image(data, MAX_PIXELS, min_short)
    except BadImage as e:
        raise BadImage(f"{where}: {e}", e.reason) from None


def set_threads(n: int) -> None:
    """torch's intra-op threads for this worker process; inter-op threads to 1.

    The inter-op pool serves only TorchScript forks (none here) and can be sized only
    before its first use, once per process: a second handler in the process keeps it.
    """
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError as e:
        logger.info("inter-op threads already set (%s); keeping %d", e, torch.get_num_interop_threads())


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


# name -> (unit, type), as declared in serving/metrics.yaml.
METRICS = {
    "ImagesServed": ("Count", MetricTypes.COUNTER),
    "ImagesRejected": ("Count", MetricTypes.COUNTER),
    "DecodeTime": ("ms", MetricTypes.GAUGE),
    "BatchSize": ("Count", MetricTypes.GAUGE),
}


def error_answer(error: BadImage) -> dict:
    return {"code": 400, "type": type(error).__name__, "message": str(error)}


class ImageClassifier(BaseHandler):
    """Top-k image classification with per-request errors inside a batch."""

    # Used before (or without) initialize, e.g. by tests of preprocess alone.
    min_short = 0
    gpu_decode = half = False
    precision = "fp32"  # what the forward pass runs in (initialize resolves the setting)
    cam_module = None  # the loaded file, when it has the methods of class activation maps
    device: torch.device  # BaseHandler.initialize sets it

    settings_class = HandlerSettings  # what this handler reads from the handler: section

    def initialize(self, context):
        # model-config.yaml's handler: section: the preprocessing and the settings.
        cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        self.settings = s = self.settings_class.read(cfg)
        self.preset = EvalPreset.from_dict(cfg)
        if s.threads:
            set_threads(int(s.threads))
        self.max_batch = max(1, int(context.system_properties.get("batch_size") or 1))
        super().initialize(context)  # loads the model through _load_torchscript_model
        self.top_k = min(int(s.top_k), len(self.mapping))
        self.min_short = s.min_short(self.preset.resize_size)
        self.half = self._cuda_option("half")
        self.gpu_decode = self._cuda_option("gpu_decode")
        if self.gpu_decode and type(self).inspect is not ImageClassifier.inspect:
            logger.warning("gpu_decode ignored: %s inspects PIL images", type(self).__name__)
            self.gpu_decode = False
        logger.info(
            "preprocessing %s, top_k %d, threads %d, jpeg_draft min short side %d, half %s, gpu_decode %s",
            self.preset,
            self.top_k,
            torch.get_num_threads(),
            self.min_short,
            self.half,
            self.gpu_decode,
        )
        # The objects that exist now (torch, the model, TorchServe) live as long as the
        # worker: out of the garbage collector's sight, its full collections stop
        # re-scanning them on every request's worth of allocations.
        gc.collect()
        gc.freeze()

    def _cuda_option(self, name: str) -> bool:
        wanted = bool(getattr(self.settings, name))
        if wanted and self.device.type != "cuda":
            logger.warning("%s: true ignored: the worker runs on %s, not CUDA", name, self.device)
        return wanted and self.device.type == "cuda"

    def _load_torchscript_model(self, model_pt_path):
        s = self.settings
        if s.quantized_engine:
            return self._load_quantized(model_pt_path, s.quantized_engine)
        model = super()._load_torchscript_model(model_pt_path).eval()
        mode = optimize_mode(s.optimize)
        if s.half and self.device.type == "cuda":
            mode = "none"  # under fp16 autocast the optimised graph's fused ops have no autocast rules
        batches = list(s.onednn_batches) if s.onednn_batches else None
        sizes = onednn_sizes(batches, self.max_batch)
        self.precision = resolve_precision(s.precision, model, self.device)
        self.cam_module = model if has_cam(model) else None
        load, rtol = (lambda: torch.jit.load(model_pt_path)), RTOL
        if self.precision == "bf16":  # the file's bf16 copy, at bf16's tolerance
            model, rtol = Method(model, BF16_METHOD), BF16_RTOL
            load = lambda: Method(torch.jit.load(model_pt_path), BF16_METHOD)  # noqa: E731
        return optimize(model, mode, load, self.preset.crop_size, self.device, sizes, rtol)

    def _load_quantized(self, model_pt_path, engine: str):
        """An int8 model: its engine's CPU kernels, whatever device the worker was given."""
        if engine not in torch.backends.quantized.supported_engines:
            raise RuntimeError(
                f"model-config.yaml: quantized_engine {engine!r} is not available "
                f"in this torch build ({torch.backends.quantized.supported_engines})"
            )
        torch.backends.quantized.engine = engine
        if self.device.type != "cpu":
            logger.warning(
                "int8 model: running on the CPU, not %s (quantized kernels are CPU kernels)", self.device
            )
            self.device, self.map_location = torch.device("cpu"), "cpu"  # half, gpu_decode: off
        return torch.jit.load(model_pt_path, map_location="cpu")

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
        """Decode and transform each request; returns (batch, {row: BadImage}, rows,
        (facts, explains)): per good image, what ``inspect`` found and what it asks to
        explain (None for a prediction)."""
        start = time.perf_counter()
        # A row straight from TorchServe carries its upload as bytes; under a KServe envelope
        # rows are the envelope's decoded instances, whose answers the envelope serialises.
        self._binary_rows = [
            isinstance(row, dict) and any(isinstance(v, (bytes, bytearray)) for v in row.values())
            for row in data
        ]
        tensors, errors, facts, explains = [], {}, [], []
        for i, row in enumerate(data):
            try:
                explain = self.explain_request(i, row)
                x, fact, decoded = self.prepare(row, keep=explain is not None)
                if explain is not None:
                    explain.decoded, explain.x = decoded, x
                tensors.append(x)
                facts.append(fact)
                explains.append(explain)
            except BadImage as e:
                errors[i] = e
                self._metric("ImagesRejected", 1, e.reason)
        self._metric("DecodeTime", round(1000 * (time.perf_counter() - start), 3))
        batch = torch.stack(tensors) if tensors else None
        return batch, errors, len(data), (facts, explains)

    def _is_explain(self) -> bool:
        # TorchServe asks request 0 only and sends the whole batch to explain_handle;
        # here every request of a batch gets its own kind of answer (explain_request).
        return False

    def explain_request(self, i: int, row) -> Explain | None:
        """What row ``i`` asks to explain, when it came to /explanations (TorchServe's front end
        sets its request header ``explain: True``); None for a prediction. BadTarget for a
        class the model lacks."""
        processor = getattr(self.context, "request_processor", None) or []
        if not processor:
            return None
        request = i if len(processor) == len(self._binary_rows) else 0  # KServe: one request, many rows
        headers = processor[request].get_request_properties()
        if headers.get("explain") != "True":
            return None
        row = row if isinstance(row, dict) else {}
        return Explain(
            parse_target(parameter(TARGET_PARAM, row, headers), self.mapping),
            wants_overlay(parameter(OVERLAY_PARAM, row, headers)),
        )

    def prepare(self, row: dict, keep: bool = False):
        """(input tensor, facts, the decoded image when ``keep``) for one request; BadImage
        names what is wrong."""
        if self.gpu_decode and not keep:
            _, data = request_image(row)
            x = self._decode_on_gpu(data) if is_jpeg(data) else None
            if x is not None:
                return x, None, None
        decoded = decode(row, self.min_short)
        x = self.preset.serve(decoded)
        return (
            (x.to(self.device) if self.gpu_decode else x),
            self.inspect(decoded.image),
            decoded if keep else None,
        )

    def _decode_on_gpu(self, data: bytes) -> torch.Tensor | None:
        """nvJPEG decode and the tensor eval transform; None: let the CPU path decide."""
        try:
            header = Image.open(io.BytesIO(data))  # header only: size, mode, orientation
            w, h = header.size
            if w * h > MAX_PIXELS or header.mode not in ("RGB", "L") or needs_colour_conversion(header):
                return None
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            image = torchvision.io.decode_jpeg(raw, mode=torchvision.io.ImageReadMode.RGB, device=self.device)
            image = orient_tensor(image, header.getexif().get(0x0112, 1))
            return self.preset.tensor_transform(image)
        except (OSError, ValueError, SyntaxError, RuntimeError) as e:
            logger.debug("GPU decode refused (%s); decoding on the CPU", e)
            return None

    def inference(self, data, *args, **kwargs):
        batch, errors, n, facts = data
        probs = aux = None
        if batch is not None:
            self._metric("BatchSize", len(batch))
            x = batch.to(self.device, non_blocking=True)
            with torch.inference_mode(), self._precision():
                out = self.model(x.half() if self.half else x)
            # A model may return (class logits, auxiliary logits), e.g. an ImageNet head.
            logits, aux = (out[0], out[1].float().cpu()) if isinstance(out, (tuple, list)) else (out, None)
            probs = logits.float().softmax(dim=1).cpu()
            self._metric("ImagesServed", len(batch))
        return probs, aux, errors, n, facts

    def _precision(self):
        # A frozen TorchScript model's weights are graph constants: .half() cannot reach
        # them, autocast casts them per op.
        if self.half:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def postprocess(self, data):
        probs, aux, errors, n, (facts, explains) = data
        top = probs.topk(self.top_k, dim=1) if probs is not None else None
        answers, j = [], 0
        for i in range(n):
            if i in errors:
                answers.append(error_answer(errors[i]))
                continue
            top_k = [
                {"label": self.mapping[str(k)], "index": k, "probability": round(p, 6)}
                for p, k in zip(top.values[j].tolist(), top.indices[j].tolist())
            ]
            answer = self.answer(top_k, probs[j], None if aux is None else aux[j], facts[j])
            if explains[j] is not None:
                answer = self.explained(answer, probs[j], explains[j])
            answers.append(answer)
            j += 1
        self._report_status(n, errors)
        if getattr(self.context, "input_names", None):  # kservev2 envelope: BYTES are strings
            answers = [json.dumps(a) for a in answers]
        else:
            # JSON text made here: TorchServe would json.dumps a dict with indent=2, which
            # runs Python's pure-Python encoder (5.5% of a MobileNetV2 worker's time, py-spy).
            for i, binary in enumerate(self._binary_rows):
                if binary:
                    answers[i] = json.dumps(answers[i])
                    self.context.set_response_content_type(i, "application/json")
        return answers

    def explained(self, answer: dict, probs: torch.Tensor, explain: Explain) -> dict:
        """``answer`` with the ``explanation`` of its top class, or of the class asked for
        (handlers/explain.py)."""
        return {**answer, "explanation": self.explanation(answer["top_k"][0]["index"], probs, explain)}

    def explanation(self, index: int, probs: torch.Tensor, explain: Explain) -> dict:
        if self.cam_module is None:
            return {
                "method": None,
                "message": "this model file has no class activation maps (an int8 export, or one "
                "exported before them): export it again in fp32 to explain its answers",
            }
        index = index if explain.target is None else explain.target
        geometry = (self.preset.resize_size, self.preset.crop_size)
        return explanation(
            self.cam_module,
            explain.x.to(self.device),
            index,
            self.mapping[str(index)],
            float(probs[index]),
            explain.decoded.size,
            geometry,
            explain.decoded if explain.overlay else None,
        )

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
