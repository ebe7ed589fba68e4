"""Datasets in ImageFolder layout: ROOT/{train,valid,test}/CLASS/*.jpg."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from models.presets import open_image

SPLITS = ("train", "valid", "test")


def image_folder(root: str | Path, split: str, transform) -> ImageFolder:
    path = Path(root) / split
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is missing: the dataset root needs {', '.join(SPLITS)} folders of class folders")
    # open_image is the decoder the handler uses too (EXIF orientation, RGB).
    return ImageFolder(str(path), transform=transform, loader=open_image)


def load_splits(root: str | Path, train_transform, eval_transform) -> dict[str, ImageFolder]:
    """The three splits; their class folders must agree, since labels come from them."""
    sets = {s: image_folder(root, s, train_transform if s == "train" else eval_transform)
            for s in SPLITS}
    classes = sets["train"].classes
    for s in SPLITS[1:]:
        if sets[s].classes != classes:
            raise ValueError(f"class folders of {s}/ differ from train/: "
                             f"{sets[s].classes} vs {classes}")
    return sets


def loader(ds: ImageFolder, batch_size: int, shuffle: bool, workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=False)
