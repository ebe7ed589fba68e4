"""The export and the handler's optimisation under other CPU kernels, on this machine.

PyTorch picks its kernels by the CPU's instruction set (ATEN_CPU_CAPABILITY: default,
avx2, avx512) and oneDNN by its own (ONEDNN_MAX_CPU_ISA: SSE41, AVX, AVX2, AVX512_CORE,
...); both can be told to use less than the CPU has. Each setting runs
tests/kernel_probe.py in a fresh process: the demo's architectures (ResNet50 and
MobileNetV2 with BatchNorm statistics from real photos, EfficientNet-Lite0 with its real
ImageNet weights) exported by training.export and loaded by the handler with oneDNN Graph and with
optimize_for_inference, and the export's bf16 copy with oneDNN Graph (emulated where the
kernels have no bf16 instructions). Everything must agree with the eager model within
handlers.optimize.RTOL of the outputs' scale (bf16: handlers.precision.BF16_RTOL); where
oneDNN Graph cannot be used, the handler must serve the model as loaded and say why in its log.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Tests costing over about 2 s are marked slow one by one (make test-fast leaves them out).

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "plainest": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
# What each library reports it runs under a setting; None: whatever the CPU has.
EXPECTED_ISA = {"default": (None, None), "avx2": ("AVX2", "AVX2"), "plainest": ("DEFAULT", "SSE4.1")}


def probe(setting: str, out: Path) -> tuple[dict, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
    }
    env.update(SETTINGS[setting], PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-m", "tests.kernel_probe", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, f"{setting}: the probe failed:\n{run.stderr[-4000:]}"
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    isa = re.search(r"onednn_verbose,.*,cpu,isa:(.*)", run.stdout)
    return json.loads(line[len("RESULT ") :]), (isa.group(1).strip() if isa else "unknown")


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.slow
def test_export_and_optimisation_agree_under_each_instruction_set(setting, tmp_path):
    result, onednn_isa = probe(setting, tmp_path)
    measured = f"{setting}: ATen {result['aten']}, oneDNN {onednn_isa}; " + json.dumps(
        result["archs"], indent=1
    )
    aten, onednn = EXPECTED_ISA[setting]
    assert aten is None or result["aten"] == aten, measured
    assert onednn is None or onednn in onednn_isa, measured
    for arch, r in result["archs"].items():
        assert r["export"]["ok"], f"{arch} export: {measured}"
        for mode in ("onednn", "jit", "onednn_bf16"):
            assert r[mode]["ok"], f"{arch} {mode}: {measured}"
        assert r["onednn_bf16"]["precision"] == "bf16" and r["onednn"]["precision"] == "fp32", measured
        onednn_log = " ".join(r["onednn"]["log"])
        if r["onednn"]["model"] == "OneDNNModel":
            assert "oneDNN Graph applied" in onednn_log, measured
        else:  # refused or fused nothing: the fallback, said in the log
            assert (
                "oneDNN Graph failed, not used" in onednn_log
                or "oneDNN Graph changed the outputs, not used" in onednn_log
            ), measured
    print(measured)
