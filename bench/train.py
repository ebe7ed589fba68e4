"""Training throughput on this machine: images/s per model, frozen vs unfrozen backbone,
with 0..N data-loader workers.

    python -m bench.train            (make bench-train)

For each model it measures three rates over the same photo-like 500x375 JPEGs:
- loader: the data loader alone (decode + augmentation), per worker count;
- compute: training steps on tensors already in memory (the model's ceiling);
- end to end: the training loop as training.fit.train runs it.
Loading is the bottleneck when end to end stays near the loader's rate, well below
compute. Results go to build/bench/train.json and train.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from bench import report
from bench.images import photo
from handlers.preset import EvalPreset
from models.zoo import get_model, get_spec
from training.data.datasets import image_folder, training_loader
from training.progress import Progress

MODELS = {"resnet50": 133, "mobilenet_v2": 4}


def make_dataset(root: Path, n: int, classes: int = 4) -> Path:
    """n photo-like 500x375 JPEGs in ROOT/train/CLASS/ (made once, reused)."""
    if len(list(root.glob("train/*/*.jpg"))) >= n:
        return root
    for i in range(n):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        photo(500, 375, seed=i).save(d / f"{i:04d}.jpg", quality=90)
    return root


def set_backbone(model: nn.Module, head: str, trainable: bool) -> None:
    """Frozen: only the head trains. Unfrozen: every layer does."""
    for name, p in model.named_parameters():
        p.requires_grad_(trainable or name.startswith(f"{head}."))


def train_loader(data: Path, model: str, batch: int, workers: int):
    ds = image_folder(data, "train", get_spec(model).train_preset.transform(EvalPreset()))
    return training_loader(ds, batch, workers, seed=0)


def rate(batches, step, steps: int, batch: int, label: str) -> float:
    """Images/s of ``step`` over ``steps`` batches after one warm-up batch."""
    it = iter(batches)
    step(*next(it))
    progress = Progress(steps, label)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(*next(it))
        progress.update(i)
    return steps * batch / (time.perf_counter() - start)


def cycle(dl):
    epoch = 0
    while True:
        dl.sampler.set_epoch(epoch)
        yield from dl
        epoch += 1


def measure(model_name: str, data: Path, batch: int, steps: int, workers: list[int]) -> list[dict]:
    torch.manual_seed(0)
    model = get_model(model_name, MODELS[model_name], weights=None)
    head = get_spec(model_name).head_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def train_step(x, y):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    rows = []
    crop = EvalPreset().crop_size
    x = torch.randn(batch, 3, crop, crop)
    y = torch.randint(0, MODELS[model_name], (batch,))
    loaders = {}
    for w in workers:
        dl = train_loader(data, model_name, batch, w)
        loaders[w] = rate(cycle(dl), lambda *_: None, steps, batch, f"{model_name} loader w={w}")
    for frozen in (True, False):
        set_backbone(model, head, not frozen)
        backbone = "frozen" if frozen else "unfrozen"
        compute = rate(
            iter(lambda: (x, y), None), train_step, steps, batch, f"{model_name} {backbone} compute"
        )
        for w in workers:
            dl = train_loader(data, model_name, batch, w)
            e2e = rate(cycle(dl), train_step, steps, batch, f"{model_name} {backbone} w={w}")
            rows.append(
                {
                    "model": model_name,
                    "backbone": backbone,
                    "workers": w,
                    "loader": loaders[w],
                    "compute": compute,
                    "end_to_end": e2e,
                    "bottleneck": "data loading" if loaders[w] < compute else "compute",
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    head = "| model | backbone | workers | loader img/s | compute img/s | end-to-end img/s | bottleneck |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backbone']} | {r['workers']} | {r['loader']:.1f} | "
            f"{r['compute']:.1f} | {r['end_to_end']:.1f} | {r['bottleneck']} |"
        )
    return "\n".join(lines)


def machine() -> str:
    """The serving benchmark's machine facts, as one line, with this process's torch threads."""
    m = report.machine()
    return f"{m['cpu']}, {torch.get_num_threads()} torch threads, torch {m['torch']}"


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Training throughput per model, frozen vs unfrozen "
        "backbone, per data-loader worker count."
    )
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch-size", type=int, default=16, help="images per training step")
    p.add_argument("--steps", type=int, default=4, help="measured steps per cell (after one warm-up)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="data-loader workers")
    p.add_argument(
        "--data", type=Path, default=Path("build/bench/train-data"), help="where the generated JPEGs are kept"
    )
    p.add_argument("--out", type=Path, default=Path("build/bench"), help="folder for train.json/.md")
    a = p.parse_args(argv)
    n = a.batch_size * (a.steps + 1)
    data = make_dataset(a.data, n)
    rows = [r for m in a.models for r in measure(m, data, a.batch_size, a.steps, a.workers)]
    facts = machine()
    md = (
        f"Training throughput, batch {a.batch_size}, 500x375 JPEGs; {facts}; "
        f"{time.strftime('%Y-%m-%d')}\n\n{table(rows)}\n"
    )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "train.json").write_text(
        json.dumps({"machine": facts, "batch_size": a.batch_size, "steps": a.steps, "rows": rows}, indent=2)
    )
    (a.out / "train.md").write_text(md)
    print("\n" + md)
    print(f"Wrote {a.out / 'train.json'} and {a.out / 'train.md'}")


if __name__ == "__main__":
    main()
