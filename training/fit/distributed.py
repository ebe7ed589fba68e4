"""Distributed data parallel under torchrun, and a no-op when run as one process.

    torchrun --nproc-per-node 2 -m training.fit.train --recipe training/fit/recipes/flying_objects.yaml ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the backend is NCCL on GPUs and
gloo on CPUs. Only rank 0 prints, writes files and saves checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup() -> Dist:
    """Join the process group torchrun describes (or none), and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        if not cuda:
            # Each process gets its share of the cores: oversubscription is slower than any gain.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return Dist(rank, world, device)


def finish(d: Dist) -> None:
    """Leave the process group at the end of a successful run: all processes wait for
    each other, then destroy it together (as torch.distributed's shutdown notes ask)."""
    if d.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_sum(d: Dist, *values: float) -> list[float]:
    """Sums of ``values`` over all processes (the values themselves in one process)."""
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """The model as DDP sees it; rebuilt at a stage change, since DDP records which
    parameters need gradients when it is built."""
    if not d.active:
        return model
    ids = [d.device.index] if d.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
