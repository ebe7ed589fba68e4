"""How close the forward pass comes to what this machine's cores can compute.

A large matrix multiply is about the most arithmetic per second a core does; a forward
pass's FLOP rate (its FLOPs counted by torch.utils.flop_counter on the TorchScript file)
as a share of it says how much any faster compilation could still win. On one thread,
as a served worker runs: the file as exported (what the built-in handler runs), under
``optimize_for_inference`` (``optimize: jit``) and compiled by oneDNN Graph
(``optimize: onednn``, the handler's default), each through handlers/optimize.py as the
handler calls it; all of them and the matrix multiply take turns, round by round.

    python -m bench.flops [--models dog_breeds flying_objects] [--batch-sizes 1 8]

The models are ``export/<name>`` when they exist, otherwise randomly initialised, as in
``make bench``. Prints a table and writes build/bench/flops.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import report
from bench.exports import MODELS, prepare_export
from bench.preprocess import paired_medians_ms
from handlers.optimize import optimize
from handlers.preset import EvalPreset
from training.export import torchscript as export_mod

MODES = ("none", "jit", "onednn")
MATMUL = 2048  # the matrix multiply's side: large enough to run at its best rate


def forward_flops(model, x: torch.Tensor) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def measure(model_pt: Path, batch_sizes: list[int], rounds: int, crop: int = EvalPreset.crop_size) -> dict:
    """GFLOP/s of the matrix multiply and of each mode × batch size, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load = lambda: torch.jit.load(str(model_pt), map_location="cpu").eval()  # noqa: E731
        models = {
            mode: optimize(load(), mode, load, crop, torch.device("cpu"), sorted({1, *batch_sizes}))
            for mode in MODES
        }
        inputs = {b: torch.randn(b, 3, crop, crop) for b in batch_sizes}
        flops = {b: forward_flops(models["none"], x) for b, x in inputs.items()}
        a, m = torch.randn(MATMUL, MATMUL), torch.randn(MATMUL, MATMUL)
        out = torch.empty(MATMUL, MATMUL)
        fns = {"matmul": lambda: torch.mm(a, m, out=out)}
        for mode, model in models.items():
            for b, x in inputs.items():
                fns[f"{mode}/{b}"] = lambda model=model, x=x: model(x)
        with torch.inference_mode():
            ms = paired_medians_ms(fns, rounds)
    finally:
        torch.set_num_threads(threads)
    peak = 2 * MATMUL**3 / ms.pop("matmul") / 1e6
    rows = []
    for key, t in ms.items():
        mode, b = key.split("/")
        rate = flops[int(b)] / t / 1e6
        rows.append(
            {
                "optimize": mode,
                "batch": int(b),
                "ms_per_image": t / int(b),
                "gflop_per_image": flops[int(b)] / int(b) / 1e9,
                "gflops": rate,
                "of_matmul": rate / peak,
            }
        )
    return {"matmul_gflops": peak, "rows": rows}  # unrounded: the table rounds


def table(name: str, result: dict) -> str:
    lines = [
        f"{name}: one thread; a {MATMUL}x{MATMUL} matrix multiply ran at "
        f"{result['matmul_gflops']:.1f} GFLOP/s",
        f"  {'optimize':9s} {'batch':>5s} {'ms/image':>9s} {'GFLOP/s':>8s} {'of matmul':>10s}",
    ]
    for r in result["rows"]:
        lines.append(
            f"  {r['optimize']:9s} {r['batch']:5d} {r['ms_per_image']:9.1f} "
            f"{r['gflops']:8.1f} {report.percent(r['of_matmul']):>10s}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--exports", type=Path, default=Path("export"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=7, help="timed runs of each, taking turns")
    p.add_argument("--out", type=Path, default=Path("build/bench"))
    a = p.parse_args(argv)
    settings = {"workers": 1, "threads": 1, "batch_size": max(a.batch_sizes), "max_batch_delay": 2}
    results = {"machine": report.machine(), "models": {}}
    for name in a.models:
        meta = prepare_export(name, a.exports, a.out / "flops", settings)
        result = measure(Path(meta["export"]) / export_mod.MODEL_FILE, a.batch_sizes, a.rounds)
        results["models"][name] = {"origin": meta["origin"], **result}
        print(table(f"{name} ({meta['origin']})", result), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "flops.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {a.out / 'flops.json'}")
    return results


if __name__ == "__main__":
    main()
