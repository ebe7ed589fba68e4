"""Datasets in ImageFolder layout: ROOT/{train,valid,test}/CLASS/*.jpg, and how batches are drawn.

Randomness is a function of (seed, epoch, index) alone: the order of samples comes
from ``EpochSampler`` and each sample's augmentation from ``SeededSamples``. A run
therefore sees the same images, augmented the same way, whatever the number of
data-loader workers or distributed processes, and a resumed run repeats exactly
what the interrupted one would have done.

Images of extreme shape are skipped, with a warning that names the file and the rule
(``shape_problem``): an image's cost in the eval transform grows with its aspect
ratio, not its file size.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder

from handlers.decode import open_image

SPLITS = ("train", "valid", "test")
BALANCE = ("none", "weights", "sampler")
# The longest side over the shortest that training and evaluation take. Resize(resize_size)
# brings the short side to resize_size, so the resized image holds aspect x resize_size^2
# pixels: at this bound 1.3 million for 256 (4 MB), while every camera format, panoramas
# included (to about 10:1), passes. A 1 x 100000 PNG of a few hundred bytes would need
# 25.6 gigapixels. Serving crops before it resamples (EvalPreset.serve) and needs no bound.
MAX_ASPECT = 20


class SkippedImage(UserWarning):
    """An image training and evaluation leave out; the message names it and the rule."""


def shape_problem(size: tuple[int, int]) -> str | None:
    """Why an image of ``size`` (w, h) is too costly to resize, or None when it is not."""
    w, h = size
    if min(w, h) < 1:
        return f"{w}x{h} px holds no pixels"
    aspect = max(w, h) / min(w, h)
    if aspect > MAX_ASPECT:
        return (
            f"{w}x{h} px: aspect ratio {aspect:.1f}:1 is over {MAX_ASPECT}:1, and resizing "
            f"its short side would make the long side {aspect:.0f} times longer"
        )
    return None


def header_size(path: str) -> tuple[int, int] | None:
    """(w, h) from the file's header, without decoding; None when it is not an image (the
    loader then raises, as it always did)."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def skip_extreme_shapes(ds: ImageFolder) -> ImageFolder:
    """Leave out the images ``shape_problem`` refuses, each with a SkippedImage warning."""
    kept = []
    for path, target in ds.samples:
        size = header_size(path)
        problem = shape_problem(size) if size else None
        if problem:
            warnings.warn(
                f"skipped {path}: {problem} (training.data.clean reports it as extreme_aspect)",
                SkippedImage,
                stacklevel=3,
            )
        else:
            kept.append((path, target))
    if len(kept) < len(ds.samples):
        ds.samples = ds.imgs = kept
        ds.targets = [t for _, t in kept]
    return ds


def image_folder(root: str | Path, split: str, transform) -> ImageFolder:
    path = Path(root) / split
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is missing: the dataset root needs {', '.join(SPLITS)} folders of class folders"
        )
    # open_image is the decoder the handler uses too (EXIF orientation, RGB).
    return skip_extreme_shapes(ImageFolder(str(path), transform=transform, loader=open_image))


def load_splits(root: str | Path, train_transform, eval_transform) -> dict[str, ImageFolder]:
    """The three splits; their class folders must agree, since labels come from them."""
    sets = {s: image_folder(root, s, train_transform if s == "train" else eval_transform) for s in SPLITS}
    classes = sets["train"].classes
    for s in SPLITS[1:]:
        if sets[s].classes != classes:
            raise ValueError(f"class folders of {s}/ differ from train/: {sets[s].classes} vs {classes}")
    return sets


def class_counts(ds: ImageFolder) -> list[int]:
    counts = Counter(ds.targets)
    return [counts.get(c, 0) for c in range(len(ds.classes))]


def class_weights(ds: ImageFolder) -> torch.Tensor:
    """Loss weights inversely proportional to class frequency, mean 1 over the samples."""
    counts = torch.tensor(class_counts(ds), dtype=torch.float)
    return len(ds.targets) / (len(counts) * counts.clamp(min=1))


def sample_weights(ds: ImageFolder) -> torch.Tensor:
    """Per-sample draw weights under which every class is drawn equally often."""
    counts = class_counts(ds)
    return torch.tensor([1.0 / counts[t] for t in ds.targets], dtype=torch.double)


class EpochSampler(Sampler[int]):
    """Sample order for one epoch, for one process of ``world`` processes.

    Every process computes the same global order from (seed, epoch): a permutation,
    a weighted draw with replacement (``weights``, the balanced sampler) or, with
    ``shuffle=False``, the dataset order. Process ``rank`` takes positions rank,
    rank+world, ...; so with a global batch split across processes, the processes'
    batches together hold exactly the single-process batch. Training pads the order
    (repeating its start) to a multiple of ``world`` so every process takes the same
    number of steps; evaluation does not pad, so nothing is counted twice.
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        weights: torch.Tensor | None = None,
        pad: bool = True,
        tag_epoch: bool = False,
    ):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.weights, self.pad, self.tag_epoch, self.epoch = weights, pad, tag_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            idx = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        elif self.shuffle:
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if self.pad and len(idx) % self.world:
            idx += idx[: self.world - len(idx) % self.world]
        return idx

    def __iter__(self):
        mine = self.order()[self.rank :: self.world]
        # SeededSamples needs the epoch; passing it with the index reaches persistent workers.
        return iter([(i, self.epoch) for i in mine] if self.tag_epoch else mine)

    def __len__(self) -> int:
        total = -(-self.n // self.world) * self.world if self.pad else self.n
        return len(range(self.rank, total, self.world))


class SeededSamples(Dataset):
    """An ImageFolder indexed by (index, epoch) whose random transform is seeded by
    (seed, epoch, index).

    torchvision's transforms draw from torch's global generator; forking it around
    each sample keeps the draws independent of which process or worker loads it.
    """

    def __init__(self, ds: ImageFolder, seed: int):
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]):
        i, epoch = key
        path, target = self.ds.samples[i]
        image = self.ds.loader(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
            return self.ds.transform(image), target


def training_loader(
    ds: ImageFolder,
    batch_size: int,
    workers: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    balanced: bool = False,
) -> DataLoader:
    """How training batches are drawn: this process's share of the seeded epoch order
    (drawn class-balanced with ``balanced``), each image augmented by its own seed.
    Call ``.sampler.set_epoch(e)`` before each epoch."""
    sampler = EpochSampler(
        len(ds),
        shuffle=True,
        seed=seed,
        rank=rank,
        world=world,
        tag_epoch=True,
        weights=sample_weights(ds) if balanced else None,
    )
    return loader(SeededSamples(ds, seed), batch_size, False, workers, sampler=sampler)


def loader(
    ds: Dataset, batch_size: int, shuffle: bool, workers: int, sampler: Sampler | None = None
) -> DataLoader:
    if sampler is not None:
        shuffle = False
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=False,
    )
