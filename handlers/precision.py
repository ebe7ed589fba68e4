"""The number format of a served model's forward pass: the handler's ``precision`` setting.

- ``fp32``: the model as trained.
- ``bf16``: the export's bfloat16 copy (its ``forward_bf16`` method: weights and input in
  bfloat16, outputs returned as float32). CPUs with bf16 units (``avx512_bf16`` from
  AMD Zen 4 and Intel Cooper Lake on, ``amx_bf16`` from Sapphire Rapids on) run it two to
  five times faster; elsewhere oneDNN emulates it, slower than fp32.
- ``auto`` (the default): bf16 where the CPU computes it natively, else fp32.

An export that offers bf16 passed its accuracy gate at export time
(training/export/bf16.py). A model file without ``forward_bf16`` (an int8 export, one
exported with ``--precision fp32``, or an older one) always runs in fp32.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

RUN_PRECISIONS = ("fp32", "bf16")  # what a worker runs; auto resolves to one of them
PRECISIONS = ("auto", *RUN_PRECISIONS)
BF16_METHOD = "forward_bf16"
# CPU flags (/proc/cpuinfo) of native bf16 arithmetic: AVX-512 BF16 (dot products of bf16
# pairs) and AMX (bf16 tile matrix multiplication).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN's instruction-set ceilings below which it has no bf16 instructions
# (ONEDNN_MAX_CPU_ISA caps what it uses, whatever the CPU has).
_NO_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")

# How far a bf16 forward pass may stray from fp32, relative to the outputs' scale. bf16
# keeps 8 significant bits (each rounding off by up to 2^-9 = 0.2%); through tens of layers
# the errors add up to a few percent of the scale (3.8% measured for EfficientNet-Lite0 on
# 162 real photos, docs/export.md), twice that left for deeper networks; a real fault
# (a wrong weight, a missing layer) moves outputs by the order of the scale itself.
BF16_RTOL = 0.1


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16(flags: set[str] | None = None, env=os.environ) -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively for oneDNN, and why (for the log)."""
    flags = cpu_flags() if flags is None else flags
    found = [f for f in BF16_FLAGS if f in flags]
    if not found:
        return False, f"the CPU has none of {', '.join(BF16_FLAGS)}"
    cap = env.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap in _NO_BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from its bf16 instructions"
    return True, f"the CPU has {', '.join(found)}"


def resolve_precision(
    setting: str, model, device: torch.device, flags: set[str] | None = None, env=os.environ
) -> str:
    """``fp32`` or ``bf16``: what the worker runs for model-config.yaml's ``precision``,
    with a log line that says why."""
    if setting not in PRECISIONS:
        raise ValueError(f"model-config.yaml: precision {setting!r} is not one of {PRECISIONS}")
    if setting == "fp32":
        return "fp32"
    if not hasattr(model, BF16_METHOD):
        logger.info("precision fp32: the model file has no bf16 copy (precision %s asked)", setting)
        return "fp32"
    if device.type != "cpu":
        logger.info("precision fp32: bf16 is a CPU setting; the worker runs on %s", device)
        return "fp32"
    native, why = native_bf16(flags, env)
    if setting == "bf16":
        if not native:
            logger.warning("precision bf16 as set, though %s: slower than fp32 here", why)
        else:
            logger.info("precision bf16 as set (%s)", why)
        return "bf16"
    logger.info("precision %s: auto, %s", "bf16" if native else "fp32", why)
    return "bf16" if native else "fp32"
