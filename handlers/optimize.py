"""How a served model is optimised after loading: the handler's ``optimize`` setting.

- ``onednn`` (the export's default): oneDNN Graph fusion, compiled once per batch size
  that a batch is cut into (OneDNNModel). CPU workers only; on a GPU it means ``jit``.
  The fastest forward pass on the CPU, for memory and start time: a copy of the model
  per size. ``onednn_batches`` chooses the sizes (``onednn_sizes``); ResNet50 exports
  compile batch 1 only (models/architectures.py).
- ``jit`` (``true`` in older archives): torch.jit.optimize_for_inference (it cannot be
  saved so with torch 2.13), faster than the model as loaded.
- ``none`` (``false``): the model as loaded.

docs/performance.md has the measured speeds and costs of each.

Each is checked against the loaded model (``optimized``) and skipped with a warning
if it fails or changes the outputs. The archive ships this module with the handler
(serving/archive.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


OPTIMIZE_MODES = ("onednn", "jit", "none")


def optimize_mode(value) -> str:
    """model-config.yaml's ``optimize``: a mode, or true/false as older archives wrote it."""
    if value is True:
        return "jit"
    if value is False or value is None:
        return "none"
    if value not in OPTIMIZE_MODES:
        raise ValueError(f"model-config.yaml: optimize {value!r} is not one of {OPTIMIZE_MODES}")
    return value


def tensors(out) -> list[torch.Tensor]:
    """A model's output as a list: the tensor, or those of its tuple (e.g. an ImageNet head's)."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


# How far two float32 computations of the same network may differ, relative to the
# outputs' scale (their largest magnitude). Kernels chosen by instruction set (AVX-512,
# AVX2, SSE4.1), convolution algorithm and oneDNN's fused post-ops each round differently,
# layer after layer; through ResNet50 that stays orders of magnitude below 1e-3 of the
# scale (docs/export.md has the measured spread), while a real fault (a missing
# layer, BatchNorm in train mode, a wrong weight) moves outputs by a sizeable fraction of it.
RTOL = 1e-3


@dataclass(frozen=True)
class Agreement:
    """How two models' outputs on the same input compare, output tensor by tensor."""

    max_diff: float  # the largest absolute difference, in the output that differs most
    scale: float  # that output's scale: the largest magnitude of the reference's values
    decisive_rows: int  # rows whose top class the reference decides by more than the tolerance
    flipped_rows: int  # of those, rows whose top class differs
    rtol: float = RTOL
    # Why the outputs cannot be compared value by value (another number of outputs, another
    # shape, a NaN or an infinity): such outputs never agree.
    mismatch: str = ""

    @property
    def relative(self) -> float:
        if self.mismatch:
            return math.inf
        if not self.scale:
            return math.inf if self.max_diff else 0.0
        return self.max_diff / self.scale

    @property
    def ok(self) -> bool:
        return not self.mismatch and self.relative <= self.rtol and self.flipped_rows == 0

    def __str__(self) -> str:
        if self.mismatch:
            return f"{self.mismatch} (tolerance {self.rtol:g})"
        return (
            f"max difference {self.max_diff:.1e}, {self.relative:.1e} of the outputs' scale "
            f"{self.scale:.3g} (tolerance {self.rtol:g}); top class kept in "
            f"{self.decisive_rows - self.flipped_rows}/{self.decisive_rows} decisive rows"
        )


def _top_class_flips(got: torch.Tensor, want: torch.Tensor, tol: float) -> tuple[int, int]:
    """(decisive rows, flipped rows): a row is decisive when the reference's best class
    leads the next by more than twice ``tol``, so no change within ``tol`` can reorder them."""
    if want.dim() != 2 or want.shape[1] < 2:
        return 0, 0
    top2 = want.float().topk(2, dim=1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * tol
    flipped = decisive & (got.argmax(1) != want.argmax(1))
    return int(decisive.sum()), int(flipped.sum())


def compare(got, want, rtol: float = RTOL) -> Agreement:
    """The agreement of two models' outputs (a tensor or a tuple of them) on one input;
    each output tensor is measured against its own scale. Outputs of another count or
    shape, and non-finite values on either side, are a mismatch: a NaN compares false with
    everything, so it would otherwise never count as a difference."""
    got, want = tensors(got), tensors(want)
    if len(got) != len(want):
        return Agreement(
            math.inf, 0.0, 0, 0, rtol, f"{len(got)} output tensors where the reference has {len(want)}"
        )
    worst, decisive, flipped = (0.0, 0.0), 0, 0
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return Agreement(
                math.inf,
                0.0,
                0,
                0,
                rtol,
                f"output {i} has shape {tuple(g.shape)} where the reference's is {tuple(w.shape)}",
            )
        g, w = g.detach().float(), w.detach().float()
        for side, t in (("the output", g), ("the reference", w)):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return Agreement(
                    math.inf, 0.0, 0, 0, rtol, f"{side} {i} has {bad} non-finite values (NaN or infinity)"
                )
        diff, scale = (g - w).abs().max().item(), w.abs().max().item()
        if diff * worst[1] >= worst[0] * scale:  # diff / scale >= the worst so far
            worst = (diff, scale)
        d, f = _top_class_flips(g, w, rtol * scale)
        decisive, flipped = decisive + d, flipped + f
    return Agreement(*worst, decisive, flipped, rtol)


class Method:
    """A TorchScript module called through another method than ``forward`` (the bf16 copy's
    ``forward_bf16``, handlers/precision.py)."""

    def __init__(self, module, name: str):
        self.module, self.name = module, name
        self._method = getattr(module, name)

    def __call__(self, x: torch.Tensor):
        return self._method(x)

    def eval(self) -> Method:
        return self


def optimize_for_inference(model):
    """torch.jit.optimize_for_inference of a module, or of the module behind a ``Method``
    (the method kept)."""
    if isinstance(model, Method):
        return Method(torch.jit.optimize_for_inference(model.module, [model.name]), model.name)
    return torch.jit.optimize_for_inference(model)


def optimized(
    model,
    example: torch.Tensor,
    build=optimize_for_inference,
    name: str = "optimize_for_inference",
    rtol: float = RTOL,
):
    """``build(model)`` if it runs and agrees with ``model`` on ``example`` (``compare``);
    otherwise ``model``, with a warning that says why."""
    try:
        fast = build(model)
        with torch.inference_mode():
            want, got = model(example), fast(example)
        agreement = compare(got, want, rtol)
    except Exception as e:  # noqa: BLE001 - any failure means: serve the model as loaded
        logger.warning("%s failed, not used: %s", name, e)
        return model
    if not agreement.ok:
        logger.warning("%s changed the outputs, not used: %s", name, agreement)
        return model
    logger.info("%s applied (%s)", name, agreement)
    return fast


@contextlib.contextmanager
def onednn_fusion():
    """oneDNN Graph fusion on while TorchScript compiles; the flag is process-wide."""
    before = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(True)
    try:
        yield
    finally:
        torch.jit.enable_onednn_fusion(before)


def chunk_sizes(batch_size: int) -> list[int]:
    """1, 2, 4, ... up to ``batch_size``, and ``batch_size`` itself."""
    return sorted({1 << k for k in range(batch_size.bit_length())} | {batch_size})


def onednn_sizes(value, batch_size: int) -> list[int]:
    """The batch sizes oneDNN Graph compiles a copy of the model for: model-config.yaml's
    ``onednn_batches`` (sizes including 1, so that any batch can be cut into them), or
    by default ``chunk_sizes(batch_size)``. Fewer sizes, less memory, for a model that
    runs about as fast per image alone as in a batch (ResNet50)."""
    if value is None:
        return chunk_sizes(batch_size)
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values) or 1 not in values:
        raise ValueError(
            f"model-config.yaml: onednn_batches {value!r} must be batch sizes "
            f"that include 1, e.g. [1] or [1, 8]"
        )
    return sorted(set(values))


class OneDNNModel:
    """A CPU TorchScript model compiled by oneDNN Graph once per batch size of ``sizes``.

    oneDNN Graph fuses conv + bias + add + relu and keeps weights in its own layout, for
    the input shape and torch thread count it compiled with: a batch of another size
    runs unfused, and after torch.set_num_threads the kernels keep their old thread
    count. So each size gets its own copy of the model, a batch runs as chunks of these
    sizes, largest first (7 = 4 + 2 + 1: nothing padded, and a small chunk costs little
    more per image than a large one), and a change of thread count recompiles.
    """

    def __init__(self, load, sizes, crop: int):
        self.load, self.sizes, self.crop = load, sorted(set(sizes), reverse=True), crop
        self.compile()

    def compile(self) -> None:
        """Load and compile a copy per size for torch's current thread count."""
        copies = {}
        with onednn_fusion(), torch.inference_mode():
            for b in self.sizes:
                copies[b] = m = self.load().eval()
                x = torch.zeros(b, 3, self.crop, self.crop)
                for _ in range(2):  # a profiling run, then compilation
                    m(x)
                if "oneDNNFusionGroup" not in str(torch.jit.last_executed_optimized_graph()):
                    raise RuntimeError(f"oneDNN Graph fused nothing at batch size {b}")
        self.copies, self.threads = copies, torch.get_num_threads()

    def __call__(self, x: torch.Tensor):
        if torch.get_num_threads() != self.threads:
            logger.info("torch threads %d -> %d: recompiling", self.threads, torch.get_num_threads())
            self.compile()
        outs, i = [], 0
        while i < len(x):
            b = next(s for s in self.sizes if s <= len(x) - i)
            outs.append(self.copies[b](x[i : i + b]))
            i += b
        if len(outs) == 1:
            return outs[0]
        if isinstance(outs[0], (tuple, list)):  # e.g. (class logits, ImageNet logits)
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)

    def eval(self) -> OneDNNModel:
        return self


def optimize(model, mode: str, load, crop: int, device: torch.device, sizes: list[int], rtol: float = RTOL):
    """The model to serve under ``mode``; ``load()`` loads the file again (oneDNN Graph
    needs a copy per batch size of ``sizes``). oneDNN Graph that fails falls back to ``jit``.
    ``rtol``: how far the optimised outputs may stray (a bf16 model's kernels round more)."""
    if mode == "none":
        return model
    if mode == "onednn" and device.type == "cpu":
        example = torch.randn(min(3, sum(sizes)), 3, crop, crop)  # 3 = 2 + 1: chunked
        fast = optimized(model, example, lambda _: OneDNNModel(load, sizes, crop), "oneDNN Graph", rtol)
        if fast is not model:
            return fast
    return optimized(model, torch.randn(2, 3, crop, crop, device=device), rtol=rtol)
