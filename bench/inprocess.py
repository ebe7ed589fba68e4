"""The in-process figure: the served handler's own decode + preprocessing + forward, with
no server and no HTTP. What the server should approach.

    python -m bench.inprocess --export build/bench/exports/flying_objects --threads 1 \
        --images 500x375=a.jpg,b.jpg --batch-sizes 1 4 8 16 --out result.json

bench.harness runs one such process per served worker, each with a worker's threads,
side by side (--ready-file / --go-file start their timing together), and adds up their
images/s: the server's arrangement of the cores without the server. One process with
every thread instead was measured here to fall to a tenth of one thread's speed whenever
other processes held a core: its threads wait for each other at every parallel region.

The handler that model-config.yaml names (handlers/image_classifier.py, or the dog
app's handlers/dog_breeds.py) is initialised inside TorchServe's own Context from the
export folder, so it reads the same model-config.yaml as the served archive (decoding
options, optimize, top_k) and loads model.pt as its workers do; each batch goes through
its preprocess, inference and postprocess, one image after the other on the main thread
as in a worker. A handler with per-image checks (the dog app's face check) runs them
where it runs them in a worker, inside preprocess and postprocess; their time alone is
also measured per image (``checks_ms``), and every image's answer is recorded.

The handler sets its per-worker ``threads``, then this process --threads. With --gpu N the
handler gets GPU N as a worker does (TorchServe's gpu_id), so it runs where the served
model runs.

Run as a subprocess by bench.run so that it gets the same environment as the servers
(glibc reads MALLOC_* at process start) and shares no threads with the load generator.

With --timer it times single images on request instead (``SingleImageTimer``): bench.run
interleaves them with lone requests to the server, so that the served latency at
concurrency 1 is compared with in-process timings of the same minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from ts.context import Context, RequestProcessor

from bench.images import image_args, read_image_args
from handlers.dog_breeds import DogBreedClassifier
from handlers.image_classifier import ImageClassifier, decode
from handlers.preset import EvalPreset

# model-config.yaml's handler name -> the handler class a worker runs.
HANDLERS = {"image_classifier": ImageClassifier, "dog_breeds": DogBreedClassifier}


def load_handler(export: Path, threads: int, gpu: int | None = None) -> ImageClassifier:
    """The handler as a worker initialises it; ``gpu``: the GPU id TorchServe would give
    the worker (the handler stays on the CPU where torch has no CUDA)."""
    config = yaml.safe_load((export / "model-config.yaml").read_text())
    ctx = Context(
        export.name,
        str(export),
        {"model": {"serializedFile": "model.pt"}},
        batch_size=int(config.get("batchSize", 1)),
        gpu=gpu,
        mms_version="0.12.0",
        metrics=None,
        model_yaml_config=config,
    )
    handler = HANDLERS[config.get("handler", {}).get("name", "image_classifier")]()
    handler.initialize(ctx)
    handler.context = ctx  # TorchServe sets it per batch in handle(); postprocess reads it
    torch.set_num_threads(threads)  # after the handler's own per-worker setting
    return handler


def classify(handler: ImageClassifier, images: list[bytes]) -> list:
    """One batch through the handler, as a worker runs it (without TorchServe's metrics):
    the answers as the handler hands them to TorchServe (JSON text for a raw body)."""
    handler.context.request_processor = [RequestProcessor({}) for _ in images]
    rows = [{"body": bytearray(b)} for b in images]
    return handler.postprocess(handler.inference(handler.preprocess(rows)))


def accepted(answers: list) -> list[dict]:
    """The answers, parsed; an image the handler refused is an error, since a refused image
    would be timed without its forward pass."""
    parsed = [json.loads(a) if isinstance(a, str) else a for a in answers]
    if any("code" in a for a in parsed):
        raise RuntimeError(f"the handler refused a benchmark image: {parsed}")
    return parsed


def answers_of(handler: ImageClassifier, images: list[bytes]) -> list[dict]:
    return accepted(classify(handler, images))


def timed(handler: ImageClassifier, images: list[bytes]) -> float:
    """Seconds one batch takes through the handler; an image it refuses is an error."""
    t0 = time.perf_counter()
    answers = classify(handler, images)
    elapsed = time.perf_counter() - t0
    accepted(answers)
    return elapsed


def has_checks(handler: ImageClassifier) -> bool:
    """Whether the handler does per-image work beside the classifier's (the face check)."""
    return type(handler).inspect is not ImageClassifier.inspect


def checks_ms(handler: ImageClassifier, data: bytes, repeats: int = 9) -> float:
    """Median ms of the handler's per-image checks on one image, as a worker runs them:
    ``inspect`` on the decoded image (in preprocess) and ``answer`` on its model outputs
    (in postprocess; the dog app searches its grey copy for faces there unless it is a dog)."""
    image = decode({"body": data}, handler.min_short).image
    probs, aux, _, _, _ = handler.inference(handler.preprocess([{"body": bytearray(data)}]))
    top_k = [{"label": handler.mapping[str(int(probs[0].argmax()))]}]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        handler.answer(top_k, probs[0], None if aux is None else aux[0], handler.inspect(image))
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def run_batches(
    handler, images: list[bytes], batch: int, seconds: float, min_batches: int, warmup_batches: int = 2
) -> dict:
    """Images/s over whole batches, and the time of each batch."""
    n = 0

    def one_batch() -> float:
        nonlocal n
        chunk = [images[(n + j) % len(images)] for j in range(batch)]
        n += batch
        return timed(handler, chunk)

    # TorchScript optimises on its first calls per shape; a oneDNN Graph model
    # (handlers/optimize.py) recompiles here for this process's thread count.
    for _ in range(warmup_batches):
        one_batch()
    times = []
    start = time.perf_counter()
    while len(times) < min_batches or time.perf_counter() - start < seconds:
        times.append(one_batch())
    total = sum(times)
    return {
        "batch_size": batch,
        "batches": len(times),
        "images": batch * len(times),
        "images_per_s": batch * len(times) / total,
        "batch_times_s": times,
    }


def serve_timings(handler, images: dict[str, list[bytes]], commands, replies) -> None:
    """--timer: after a warm-up, read "SIZE INDEX" lines and answer each with the
    milliseconds one image takes through the handler, until the input ends."""
    for imgs in images.values():
        for data in imgs:
            for _ in range(2):
                timed(handler, [data])
    print("ready", file=replies, flush=True)
    for line in commands:
        size, i = line.split()
        ms = 1000 * timed(handler, [images[size][int(i) % len(images[size])]])
        print(f"{ms:.3f}", file=replies, flush=True)


class SingleImageTimer:
    """A bench.inprocess --timer process: ``ms(size, i)`` times image ``i`` of ``size``
    through the handler, one image on ``threads`` threads, as one request in a worker."""

    def __init__(
        self,
        export: Path,
        threads: int,
        image_files: dict[str, list[Path]],
        env: dict,
        cwd: Path,
        gpu: int | None = None,
    ):
        cmd = [
            sys.executable,
            "-m",
            "bench.inprocess",
            "--timer",
            "--export",
            str(export),
            "--threads",
            str(threads),
        ]
        cmd += ["--gpu", str(gpu)] if gpu is not None else []
        cmd += image_args(image_files)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd
        )
        for line in self.proc.stdout:  # what imports print before it starts, then "ready"
            if line.strip() == "ready":
                return
        self.close()
        raise RuntimeError(f"bench.inprocess --timer did not start (exit {self.proc.returncode})")

    def ms(self, size: str, i: int) -> float:
        try:
            print(size, i, file=self.proc.stdin, flush=True)
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise RuntimeError(f"bench.inprocess --timer ended (exit {self.proc.wait()})")
        return float(line)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> SingleImageTimer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def outputs(model, crop: int = EvalPreset.crop_size, device: torch.device | str = "cpu") -> int:
    """How many tensors the model returns (2 with an ImageNet head)."""
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, crop, crop, device=device))
    return len(out) if isinstance(out, (tuple, list)) else 1


def wait_for_go(ready: Path, go: Path, images: dict[str, list[bytes]], handler) -> None:
    """--ready-file/--go-file: warm up, say so, and wait until every process side by side
    has, so that their timed windows overlap as the server's workers' do."""
    for imgs in images.values():
        for data in imgs:
            timed(handler, [data])
    ready.touch()
    while not go.exists():
        time.sleep(0.01)


def measure(a, handler, images: dict[str, list[bytes]]) -> dict:
    result = {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(handler.device),
        "outputs": outputs(handler.model, handler.preset.crop_size, handler.device),
        "handler_settings": handler.settings.to_config(),
        "sizes": {},
    }
    for size, imgs in images.items():
        runs = []
        for b in a.batch_sizes:
            r = run_batches(handler, imgs, b, a.seconds, a.min_batches)
            print(f"    in-process {size} batch {b}: {r['images_per_s']:.1f} images/s", flush=True)
            runs.append(r)
        result["sizes"][size] = runs
    if a.checks:
        result["answers"] = {size: answers_of(handler, imgs) for size, imgs in images.items()}
        if has_checks(handler):
            result["checks_ms"] = {
                size: [round(checks_ms(handler, data), 3) for data in imgs] for size, imgs in images.items()
            }
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description="In-process decode + preprocess + forward speed.")
    p.add_argument(
        "--export",
        type=Path,
        required=True,
        help="folder with model.pt, index_to_name.json and model-config.yaml",
    )
    p.add_argument("--images", action="append", required=True, help="SIZE=file1,file2,... (repeat per size)")
    p.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--seconds", type=float, default=3.0, help="time per batch size and image size")
    p.add_argument("--min-batches", type=int, default=3, help="at least this many timed batches")
    p.add_argument("--gpu", type=int, help="run the handler on this GPU, as a worker given it does")
    p.add_argument("--out", type=Path, help="JSON result (required without --timer)")
    p.add_argument(
        "--checks",
        action="store_true",
        help="after the timing, also record each image's answer and time the "
        "handler's per-image checks (the dog app's face check)",
    )
    p.add_argument("--ready-file", type=Path, help="touched once warmed up (with --go-file)")
    p.add_argument("--go-file", type=Path, help="start timing once this file exists")
    p.add_argument(
        "--timer",
        action="store_true",
        help="time single images on request: read 'SIZE INDEX' lines on stdin, answer "
        "each with milliseconds on stdout (after a line 'ready')",
    )
    a = p.parse_args(argv)
    if not a.timer and a.out is None:
        p.error("--out is required without --timer")
    replies = sys.stdout
    if a.timer:  # stdout carries the answers only: what else prints goes to stderr
        sys.stdout = sys.stderr
    handler = load_handler(a.export, a.threads, a.gpu)
    images = read_image_args(a.images)
    if a.timer:
        serve_timings(handler, images, sys.stdin, replies)
        return
    if a.go_file:
        wait_for_go(a.ready_file, a.go_file, images, handler)
    a.out.write_text(json.dumps(measure(a, handler, images)))


if __name__ == "__main__":
    main()
