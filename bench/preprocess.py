"""Preprocessing alone: the handler's path against the plain PIL path, per image size.

Plain: ``open_image`` (full decode, EXIF, RGB) + the eval transform, as evaluation does.
Handler: ``decode_image`` with the handler's reduced JPEG decoding (``jpeg_draft``) +
``EvalPreset.serve``. Both on one thread, median of several runs, in this process; the
ratio of the two medians is the issue's target (phone photos: <= 0.25). The tensors'
difference is reported beside it (tests/test_presets.py holds the tolerance).
"""
from __future__ import annotations

import statistics
import time

import torch

from models.presets import MAX_PIXELS, EvalPreset, decode_image, open_image


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def measure(data: bytes, handler_cfg: dict, repeats: int = 7) -> dict:
    """{"plain_ms", "handler_ms", "ratio", "max_abs_diff", "mean_abs_diff"} for one image."""
    preset = EvalPreset.from_dict(handler_cfg)
    transform = preset.transform()
    min_short = round(float(handler_cfg.get("jpeg_draft", 0)) * preset.resize_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = lambda: transform(open_image(data))  # noqa: E731
        served = lambda: preset.serve(decode_image(data, MAX_PIXELS, min_short))  # noqa: E731
        plain_ms, handler_ms = _median_ms(plain, repeats), _median_ms(served, repeats)
        diff = (plain() - served()).abs()
    finally:
        torch.set_num_threads(threads)
    return {"plain_ms": round(plain_ms, 2), "handler_ms": round(handler_ms, 2),
            "ratio": round(handler_ms / plain_ms, 3), "max_abs_diff": round(diff.max().item(), 4),
            "mean_abs_diff": round(diff.mean().item(), 5), "repeats": repeats}
