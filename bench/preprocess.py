"""Preprocessing alone: the handler's path against the plain PIL path, per image size.

Plain: ``open_image`` (full decode, EXIF, RGB) + the eval transform, as evaluation does.
Handler: ``decode_image`` with the handler's reduced JPEG decoding (``jpeg_draft``) +
``EvalPreset.serve``. Both on one thread, in this process, taking turns run by run
(paired, so that the machine's slow minutes hit both); the ratio of the two medians is
the issue's target (phone photos: <= 0.25). The tensors' difference is reported beside
it (tests/test_presets.py holds the tolerance).
"""

from __future__ import annotations

import time

import torch

from bench import report
from handlers.decode import MAX_PIXELS, decode_image, open_image
from handlers.preset import EvalPreset
from handlers.settings import HandlerSettings


def paired_medians_ms(fns: dict, repeats: int) -> dict:
    """Median ms of each function, the functions taking turns round by round (the order
    flipping each round), so that a slow minute of a shared machine hits all of them."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _, name in report.take_turns(fns, range(repeats)):
        t0 = time.perf_counter()
        fns[name]()
        times[name].append(1000 * (time.perf_counter() - t0))
    return {name: report.percentile(t, 50) for name, t in times.items()}


def measure(data: bytes, handler_cfg: dict, repeats: int = 7) -> dict:
    """{"plain_ms", "handler_ms", "ratio", "max_abs_diff", "mean_abs_diff"} for one image."""
    preset = EvalPreset.from_dict(handler_cfg)
    transform = preset.transform()
    min_short = HandlerSettings.read(handler_cfg).min_short(preset.resize_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = lambda: transform(open_image(data))  # noqa: E731
        served = lambda: preset.serve(decode_image(data, MAX_PIXELS, min_short))  # noqa: E731
        cpu_start = report.cpu_snapshot()
        ms = paired_medians_ms({"plain": plain, "handler": served}, repeats)
        steal = report.steal_share(cpu_start, report.cpu_snapshot())
        diff = (plain() - served()).abs()
    finally:
        torch.set_num_threads(threads)
    return {
        "plain_ms": round(ms["plain"], 2),
        "handler_ms": round(ms["handler"], 2),
        "ratio": round(ms["handler"] / ms["plain"], 3),
        "max_abs_diff": round(diff.max().item(), 4),
        "mean_abs_diff": round(diff.mean().item(), 5),
        "repeats": repeats,
        "steal": steal,
    }
