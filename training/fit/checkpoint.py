"""The self-describing checkpoint: what training writes, and export, analysis and
quantisation read to rebuild the model (its name, options, classes and eval preprocessing
travel with the weights, as torchvision's and nanoGPT's checkpoints carry their arguments)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.zoo import get_model

if TYPE_CHECKING:
    from training.fit.settings import TrainSettings


def model_options(cfg: TrainSettings) -> dict:
    """Builder keywords that shape the network (saved in the checkpoint to rebuild it)."""
    opts = {k: True for k in ("unfreeze_layer3", "imagenet_head") if getattr(cfg, k)}
    if cfg.unfreeze_blocks is not None:
        opts["unfreeze_blocks"] = cfg.unfreeze_blocks
    if cfg.dropout is not None:
        opts["dropout"] = cfg.dropout
    return opts


def checkpoint(
    model, cfg: TrainSettings, classes, eval_preset, epoch, valid, weights="raw", train_preset=None
) -> dict:
    """``weights``: "raw" for the trained weights, "ema" for their moving average."""
    return {
        "model": cfg.model,
        "model_options": model_options(cfg),
        "num_classes": len(classes),
        "classes": list(classes),
        "eval_preset": eval_preset.to_dict(),
        "train_preset": train_preset.to_dict() if train_preset else None,
        "weights": weights,
        "args": cfg.plain(),
        "epoch": epoch,
        "valid": valid,
        "state_dict": model.state_dict(),
    }


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes (no weights download) and load its state."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = get_model(ckpt["model"], ckpt["num_classes"], **ckpt["model_options"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file: an interruption never leaves half a checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
