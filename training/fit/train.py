"""Train a registered model on an ImageFolder dataset and keep the best checkpoint.

    python -m training.fit.train --recipe dog_breeds --data DIR --out runs/dog_breeds
    torchrun --nproc-per-node 2 -m training.fit.train --recipe ... (distributed data parallel)

Each epoch prints train/valid loss and accuracy; the checkpoint with the lowest
validation loss is ``best.pt`` (what export reads), and ``last.pt`` holds the whole
training state after every epoch, so ``--resume`` continues an interrupted run
where it stopped. At the end the best checkpoint is tested (``Test Loss``,
``Test Accuracy``) and the run folder gets metrics.csv/json, settings.yaml and
the analysis PNGs (training/evaluation/analysis.py).

Staged fine-tuning: for ``--head-epochs`` epochs only the classifier head trains;
then the backbone layers the model options unfreeze (resnet50: layer4, plus layer3
with --unfreeze-layer3; mobilenet_v2: the last --unfreeze-blocks blocks; every layer
with --train-all-layers) train too, at ``lr * backbone-lr-scale``. ``--bn-stats``
keeps pretrained BatchNorm statistics (training/fit/transfer.py).

A run from pretrained weights also fits a linear probe, a logistic regression on the
frozen pretrained features (training/evaluation/probe.py), and reports its test accuracy beside
the fine-tuned one (``probe.json``, ``metrics.json``).

Augmentation is a setting like any other: each flag left unset takes the architecture's
own choice (models/augment.py TrainPreset), and settings.yaml records what was used.
Mixup/CutMix (training/fit/mixing.py) mix whole batches; with ``--ema-decay`` an exponential
moving average of the weights is validated beside them every epoch, and whichever has
the lower valid loss is what best.pt holds.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from handlers.preset import EvalPreset
from models.augment import AUTO_AUGMENT, TrainPreset
from models.weights import WeightsUnavailable
from models.zoo import get_model, get_spec, known_models
from training.data.datasets import BALANCE, EpochSampler, class_weights, load_splits, loader, training_loader
from training.evaluation.analysis import analyse, from_evaluation
from training.evaluation.evaluate import class_logits, evaluate
from training.evaluation.probe import linear_probe, with_transform
from training.fit import distributed
from training.fit.checkpoint import checkpoint, load_checkpoint, model_options, save_atomic
from training.fit.mixing import BatchMix
from training.fit.optim import (
    OPTIMIZERS,
    PER_STEP_SCHEDULES,
    SCHEDULES,
    build_optimizer,
    build_scheduler,
    set_backbone_trainable,
    split_parameters,
)
from training.fit.recipe import parse_with_recipe, save_settings
from training.fit.settings import TrainSettings
from training.fit.transfer import BN_STATS, keep_bn_statistics, train_all_layers
from training.progress import Progress


def _autocast(d: distributed.Dist, amp: bool):
    # Mixed precision where it pays: CUDA. On CPUs fp16 autocast is slower, so it is off.
    on = amp and d.device.type == "cuda"
    return torch.autocast(device_type=d.device.type, dtype=torch.float16) if on else contextlib.nullcontext()


def _step(loss, optimizer, scaler) -> None:
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def train_one_epoch(
    model,
    data,
    criterion,
    optimizer,
    d: distributed.Dist,
    scaler=None,
    amp: bool = False,
    label: str = "train",
    mix: BatchMix | None = None,
    ema: AveragedModel | None = None,
    epoch: int = 0,
    bn_stats: str = "update",
    after_step=None,
) -> dict:
    """One pass over ``data``; returns mean loss, accuracy and images/s over all processes.

    ``mix`` mixes each batch (its labels become probabilities; accuracy then counts the
    class with the larger share); ``ema`` follows the weights after every step;
    ``bn_stats`` says which BatchNorm layers keep their statistics (training/fit/transfer.py);
    ``after_step`` is called after every optimiser step (a per-step schedule).
    """
    model.train()
    keep_bn_statistics(model, bn_stats)
    loss_sum, correct, seen = 0.0, 0, 0
    progress = Progress(len(data), label) if d.main else None
    start = time.perf_counter()
    for i, (x, y) in enumerate(data, 1):
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        if mix is not None:
            x, y = mix(x, y, epoch, i)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(d, amp):
            out = class_logits(model(x))
            loss = criterion(out, y)
        _step(loss, optimizer, scaler)
        if after_step is not None:
            after_step()
        if ema is not None:
            ema.update_parameters(model.module if hasattr(model, "module") else model)
        loss_sum += loss.item() * len(y)
        correct += (out.argmax(1) == (y.argmax(1) if y.ndim == 2 else y)).sum().item()
        seen += len(y)
        if progress:
            rate = seen * d.world / (time.perf_counter() - start)
            progress.update(i, loss=loss_sum / seen, img_s=f"{rate:.1f}")
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = distributed.all_sum(d, loss_sum, correct, seen)
    return {
        "loss": loss_sum / seen,
        "acc": correct / seen,
        "correct": int(correct),
        "total": int(seen),
        "images_per_s": seen / seconds,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train an image classifier on an ImageFolder dataset (train/ valid/ test/).",
        epilog="Recipes in training/fit/recipes/ set the defaults (--recipe dog_breeds); flags override.",
    )
    p.add_argument("--recipe", help="YAML file of settings (or the name of one in training/fit/recipes/)")
    p.add_argument("--model", required=True, help=f"one of: {known_models()}")
    p.add_argument("--data", required=True, type=Path, help="dataset root with train/ valid/ test/")
    p.add_argument("--out", required=True, type=Path, help="run folder for checkpoints and metrics")
    p.add_argument("--epochs", type=int, help="training epochs in all")
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per step in all; split across processes under torchrun",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="optimiser")
    g.add_argument("--lr", type=float, help="learning rate of the head")
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, help="weight decay")
    g.add_argument(
        "--norm-bias-decay",
        type=float,
        help="weight decay of normalisation layers' parameters and of every bias "
        "(default: --weight-decay; 0 as torchvision's and timm's recipes)",
    )
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="learning-rate schedule, stepped per epoch; onecycle (torch's OneCycleLR: "
        "warm-up to --lr, cosine down to about 0) after every step",
    )
    g.add_argument(
        "--warmup-epochs",
        type=int,
        help="linear warm-up epochs before the step or cosine schedule; onecycle: the "
        "epochs of its rise (default: 30%% of the run)",
    )
    g.add_argument("--step-size", type=int, help="step: epochs between decays")
    g.add_argument("--gamma", type=float, help="step and plateau: decay factor")
    g.add_argument("--plateau-patience", type=int, help="plateau: epochs without improvement before decaying")
    g.add_argument("--min-lr-factor", type=float, help="cosine: final lr / initial lr")
    g.add_argument("--label-smoothing", type=float, help="label smoothing of the loss")
    g.add_argument(
        "--balance",
        choices=BALANCE,
        help="imbalanced classes: loss weights, or a sampler that draws classes equally",
    )
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="mixed precision (fp16 autocast) on CUDA; no effect on CPUs",
    )
    g.add_argument(
        "--ema-decay",
        type=float,
        help="exponential moving average of the weights, updated every step with this "
        "decay (0: off); validated beside the weights each epoch, the better is kept",
    )
    add_augmentation_flags(p)
    s = p.add_argument_group("staged fine-tuning")
    s.add_argument(
        "--head-epochs",
        type=int,
        help="epochs that train only the classifier head before the backbone joins",
    )
    s.add_argument(
        "--backbone-lr-scale",
        type=float,
        help="backbone learning rate = lr x this, for pretrained weights "
        "(a randomly initialised backbone trains at lr)",
    )
    s.add_argument(
        "--train-all-layers",
        action=argparse.BooleanOptionalAction,
        help="train every layer (after --head-epochs), whatever the model freezes by "
        "default (resnet50: conv1..layer3; mobilenet_v2, efficientnet_lite0: the "
        "features but --unfreeze-blocks)",
    )
    s.add_argument(
        "--bn-stats",
        choices=BN_STATS,
        help="BatchNorm statistics while training from pretrained weights: update "
        "(batch statistics, running ones follow the data: the original projects), "
        "frozen-parts (layers not trained in the stage keep their pretrained ones), "
        "frozen (every layer keeps them); random initialisation always updates",
    )
    s.add_argument(
        "--probe",
        action=argparse.BooleanOptionalAction,
        help="from pretrained weights: fit a logistic regression on the frozen "
        "features (train split) and report its test accuracy beside the result",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--weights",
        help="torchvision weights name (DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2), "
        "downloaded when online, or 'none' for random initialisation",
    )
    m.add_argument("--weights-file", type=Path, help="local torchvision state dict (offline machines)")
    m.add_argument(
        "--unfreeze-layer3",
        action=argparse.BooleanOptionalAction,
        help="resnet50: train layer3 too (the original project's second stage)",
    )
    m.add_argument(
        "--unfreeze-blocks",
        type=int,
        help="train the last N feature blocks (mobilenet_v2: 19, efficientnet_lite0: 18, "
        "torchvision models: their stages or blocks); unset: the model's default "
        "(torchvision models: every layer trains)",
    )
    m.add_argument(
        "--imagenet-head",
        action=argparse.BooleanOptionalAction,
        help="resnet50: keep the pretrained ImageNet classifier as a second output "
        "(the dog-breed handler's dog detector); needs ImageNet weights",
    )
    m.add_argument("--dropout", type=float, help="dropout of the head (the builder's default if unset)")
    m.add_argument(
        "--resize-size",
        type=int,
        help="eval preprocessing: short side resized to this (default: the weights' own, else 256)",
    )
    m.add_argument(
        "--crop-size",
        type=int,
        help="eval preprocessing: centre crop side, the resolution served (default: the "
        "weights' own, else 224)",
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "--patience",
        type=int,
        help="early stopping: stop after this many epochs without a better valid loss (0: off)",
    )
    r.add_argument("--min-delta", type=float, help="early stopping: smallest improvement")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    r.add_argument("--restart", action="store_true", help="start over although --out holds an unfinished run")
    r.add_argument("--workers", type=int, help="data-loader worker processes (per process)")
    r.add_argument("--seed", type=int, help="random seed: same seed, same run")
    r.add_argument(
        "--analysis",
        action=argparse.BooleanOptionalAction,
        help="write the analysis PNGs at the end",
    )
    p.set_defaults(**TrainSettings.defaults())  # one declaration of each default: the settings'
    return p


# Augmentation flags and the TrainPreset fields they set; unset, the architecture's own value.
AUGMENTATION = {
    "hflip": "hflip",
    "rotation": "rotation",
    "crop_scale": "scale",
    "crop_ratio": "ratio",
    "color_jitter": "color_jitter",
    "auto_augment": "auto_augment",
    "random_erasing": "random_erasing",
    "train_crop_size": "crop_size",
}


def add_augmentation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("augmentation", "unset: the architecture's own choice (saved in settings.yaml)")
    g.add_argument(
        "--hflip",
        type=float,
        help="probability of a horizontal flip; 0 for digits, text, "
        "arrows: anything whose class a mirror changes",
    )
    g.add_argument("--rotation", type=float, help="random rotation by up to this many degrees either way")
    g.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="random resized crop: fraction of the image's area a crop covers",
    )
    g.add_argument(
        "--crop-ratio",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="random resized crop: aspect ratio (width / height) range of a crop",
    )
    g.add_argument("--color-jitter", type=float, help="brightness, contrast and saturation jitter (0: off)")
    g.add_argument(
        "--auto-augment",
        choices=list(AUTO_AUGMENT),
        help="one policy of random operations: TrivialAugmentWide, RandAugment, AutoAugment",
    )
    g.add_argument("--random-erasing", type=float, help="probability of erasing a random rectangle")
    g.add_argument(
        "--train-crop-size",
        type=int,
        help="training resolution (default: --crop-size); smaller trains faster, and a "
        "model evaluated a little larger than it trained often scores better",
    )
    g.add_argument(
        "--mixup-alpha",
        type=float,
        help="mixup of whole batches, weight ~ Beta(alpha, alpha) (0: off)",
    )
    g.add_argument("--cutmix-alpha", type=float, help="cutmix of whole batches (0: off)")
    g.add_argument(
        "--mix-prob",
        type=float,
        help="probability that a batch is mixed, when mixup or cutmix is on",
    )
    g.add_argument(
        "--mix-switch-prob",
        type=float,
        help="with both on: probability that a mixed batch is cut-mixed rather than mixed up",
    )


def resolve_presets(cfg: TrainSettings, spec) -> None:
    """Fill unset eval sizes and augmentation from the model (and its weights) in place, so
    that settings.yaml says what the run used. Raises ValueError for impossible values."""
    own = spec.eval_preset_for(cfg.pretrained, cfg.weights)
    cfg.resize_size = cfg.resize_size or own.resize_size
    cfg.crop_size = cfg.crop_size or own.crop_size
    if cfg.crop_size > cfg.resize_size:
        raise ValueError(
            f"--crop-size {cfg.crop_size} is larger than --resize-size {cfg.resize_size}: "
            "the centre crop would be padded"
        )
    defaults = spec.train_preset.to_dict() | {"crop_size": cfg.crop_size}
    for flag, field in AUGMENTATION.items():
        if getattr(cfg, flag) is None:
            value = defaults[field]
            setattr(cfg, flag, tuple(value) if isinstance(value, list) else value)
    train_preset(cfg)  # its checks, now rather than after the model is built


def train_preset(cfg: TrainSettings) -> TrainPreset:
    return TrainPreset(**{field: getattr(cfg, flag) for flag, field in AUGMENTATION.items()})


def eval_preset(cfg: TrainSettings, spec) -> EvalPreset:
    own = spec.eval_preset_for(cfg.pretrained, cfg.weights)
    return EvalPreset(cfg.resize_size, cfg.crop_size, own.mean, own.std)


def parse_args(argv=None) -> TrainSettings:
    """The flags (over the recipe's defaults), checked and resolved into the run's settings."""
    p = build_parser()
    cfg = TrainSettings.from_namespace(parse_with_recipe(p, argv))
    try:
        spec = get_spec(cfg.model)
    except ValueError as e:
        p.error(str(e))
    if not cfg.weights or cfg.weights.lower() == "none" or cfg.weights_file or not spec.pretrained:
        cfg.weights = None
    try:
        resolve_presets(cfg, spec)
        BatchMix(2, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.mix_switch_prob)
    except ValueError as e:
        p.error(str(e))
    if cfg.imagenet_head and cfg.train_all_layers:
        p.error(
            "--imagenet-head keeps the pretrained layers it copies: it cannot take "
            "--train-all-layers (use --unfreeze-layer3)"
        )
    if cfg.imagenet_head and not cfg.pretrained:
        p.error(
            "--imagenet-head needs ImageNet weights (--weights DEFAULT or --weights-file): "
            "a randomly initialised head knows no ImageNet classes"
        )
    if cfg.schedule == "plateau" and cfg.warmup_epochs:
        p.error("--warmup-epochs works with the step and cosine schedules, not plateau")
    if cfg.resume and cfg.restart:
        p.error("--resume and --restart exclude each other")
    return cfg


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


class Run:
    """One training run: its data, model, optimiser and the files in its folder."""

    def __init__(self, cfg: TrainSettings, d: distributed.Dist):
        self.cfg, self.d = cfg, d
        if cfg.batch_size % d.world:
            raise ValueError(f"--batch-size {cfg.batch_size} must divide by the {d.world} processes")
        spec = get_spec(cfg.model)
        self.eval_preset, self.train_preset = eval_preset(cfg, spec), train_preset(cfg)
        self.sets = load_splits(
            cfg.data, self.train_preset.transform(self.eval_preset), self.eval_preset.transform()
        )
        self.classes = self.sets["train"].classes
        self.model = get_model(
            cfg.model,
            len(self.classes),
            weights=cfg.weights,
            weights_file=cfg.weights_file,
            **model_options(cfg),
        ).to(d.device)
        check_input_sizes(self.model, cfg, d.device)
        if cfg.train_all_layers:
            train_all_layers(self.model)
        self.head_name = spec.head_of(self.model)
        self.head, self.backbone = split_parameters(self.model, self.head_name)
        self.pretrained = cfg.pretrained
        # A lower rate protects pretrained features; a randomly initialised backbone has none.
        self.backbone_scale = cfg.backbone_lr_scale if self.pretrained else 1.0
        # Random initialisation has no statistics worth keeping: its BatchNorm layers learn them.
        self.bn_stats = cfg.bn_stats if self.pretrained else "update"
        self.optimizer = build_optimizer(self.head, self.backbone, cfg.optim, self.backbone_scale, self.model)
        self.mix = BatchMix(
            len(self.classes), cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.mix_switch_prob, cfg.seed
        )
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
            if cfg.ema_decay
            else None
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and d.device.type == "cuda")
        weights = class_weights(self.sets["train"]).to(d.device) if cfg.balance == "weights" else None
        self.criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss()
        per_process = cfg.batch_size // d.world
        self.train_dl = training_loader(
            self.sets["train"],
            per_process,
            cfg.workers,
            cfg.seed,
            d.rank,
            d.world,
            balanced=cfg.balance == "sampler",
        )
        valid = self.sets["valid"]
        self.valid_dl = loader(
            valid,
            per_process,
            False,
            cfg.workers,
            sampler=EpochSampler(len(valid), shuffle=False, rank=d.rank, world=d.world, pad=False),
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, len(self.train_dl))
        self.per_step = cfg.schedule in PER_STEP_SCHEDULES
        self.probe: dict | None = None
        self.history: list[dict] = []
        self.best, self.bad_epochs, self.start_epoch = float("inf"), 0, 0
        self.stage = None

    def summary(self) -> str:
        cfg = self.cfg
        sizes = ", ".join(f"{s} {len(ds)}" for s, ds in self.sets.items())
        return (
            f"{cfg.model}: {len(self.classes)} classes, {sizes} images, device {self.d.device}"
            + (f", {self.d.world} processes" if self.d.active else "")
            + f"; trains {len(self.head)} head tensors at lr {cfg.lr:g} and "
            f"{len(self.backbone)} backbone tensors at lr {cfg.lr * self.backbone_scale:g}"
            + (f"; BatchNorm statistics: {self.bn_stats}" if self.bn_stats != "update" else "")
        )

    def fit_probe(self, resuming: bool) -> dict:
        """The linear probe on the pretrained features (before any training step), written
        to probe.json; a resumed run reads it back, its model being no longer pretrained."""
        path = self.cfg.out / "probe.json"
        if resuming and path.exists():
            return json.loads(path.read_text())
        t = self.eval_preset.transform()
        splits = {s: with_transform(ds, t) for s, ds in self.sets.items()}
        probe = linear_probe(
            self.model,
            self.head_name,
            splits,
            len(self.classes),
            self.cfg.batch_size,
            self.cfg.workers,
            self.d.device,
        )
        path.write_text(json.dumps(probe, indent=2))
        print(probe_line(probe), flush=True)
        return probe

    def set_stage(self, epoch: int) -> None:
        """Stage 1 (head only) for the first head-epochs, then stage 2 with the backbone."""
        stage = 1 if epoch < self.cfg.head_epochs and self.backbone else 2
        if stage != self.stage:
            set_backbone_trainable(self.backbone, stage == 2)
            self.ddp = distributed.wrap(self.model, self.d)
            if self.stage is not None and self.d.main:
                print(
                    f"Stage 2 from epoch {epoch + 1}: backbone joins at lr "
                    f"{self.cfg.lr * self.backbone_scale:g}",
                    flush=True,
                )
            self.stage = stage

    def state(self, epoch: int, finished: bool = False) -> dict:
        """Everything needed to continue after ``epoch`` (0-based) as if never interrupted."""
        return {
            "epoch": epoch,
            "finished": finished,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "rng": torch.get_rng_state(),
            "model_name": self.cfg.model,
            "classes": list(self.classes),
            "ema": self.ema.state_dict() if self.ema else None,
        }

    def restore(self, path: Path) -> None:
        s = torch.load(path, map_location="cpu", weights_only=True)
        if s["model_name"] != self.cfg.model or s["classes"] != list(self.classes):
            raise ValueError(
                f"{path} is a run of {s['model_name']} on classes {s['classes'][:5]}...; "
                f"it cannot continue as {self.cfg.model} on this data"
            )
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None:
            if s.get("ema") is None:
                raise ValueError(f"{path} was written without --ema-decay; it cannot continue with it")
            self.ema.load_state_dict(s["ema"])
        self.history, self.best, self.bad_epochs = s["history"], s["best"], s["bad_epochs"]
        torch.set_rng_state(s["rng"])
        self.start_epoch = s["epoch"] + 1

    def step_schedule(self, valid_loss: float) -> None:
        if self.per_step:
            return  # stepped in train_one_epoch
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(valid_loss)
        else:
            self.scheduler.step()

    def epoch(self, epoch: int) -> bool:
        """Train and validate one epoch, save checkpoints; returns False when early stopping says stop."""
        cfg, d = self.cfg, self.d
        self.set_stage(epoch)
        self.train_dl.sampler.set_epoch(epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        tr = train_one_epoch(
            self.ddp,
            self.train_dl,
            self.criterion,
            self.optimizer,
            d,
            self.scaler,
            cfg.amp,
            label=f"epoch {epoch + 1}/{cfg.epochs}",
            mix=self.mix if self.mix.active else None,
            ema=self.ema,
            epoch=epoch,
            bn_stats=self.bn_stats,
            after_step=self.scheduler.step if self.per_step else None,
        )
        raw = evaluate(self.model, self.valid_dl, self.eval_criterion, d)
        ema = evaluate(self.ema.module, self.valid_dl, self.eval_criterion, d) if self.ema else None
        # The weights this epoch offers: the average where it validates better.
        weights, va = ("ema", ema) if ema and ema["loss"] < raw["loss"] else ("raw", raw)
        self.step_schedule(va["loss"])
        self.history.append(
            {
                "epoch": epoch + 1,
                "stage": self.stage,
                "lr": lr,
                "train": tr,
                "valid": va,
                "weights": weights,
                "valid_raw": raw,
                "valid_ema": ema,
                "seconds": time.perf_counter() - t0,
            }
        )
        improved = va["loss"] < self.best - cfg.min_delta
        self.best = min(self.best, va["loss"])
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        stop = bool(cfg.patience) and self.bad_epochs >= cfg.patience
        if d.main:
            if improved:
                model = self.ema.module if weights == "ema" else self.model
                save_atomic(
                    checkpoint(
                        model, cfg, self.classes, self.eval_preset, epoch + 1, va, weights, self.train_preset
                    ),
                    cfg.out / "best.pt",
                )
            save_atomic(self.state(epoch, finished=stop or epoch + 1 == cfg.epochs), cfg.out / "last.pt")
            write_history(self.history, cfg.out)
            print(
                epoch_line(epoch, tr, raw, ema, lr, time.perf_counter() - t0)
                + (f"  (saved best.pt: {weights} weights)" if improved else ""),
                flush=True,
            )
            if stop:
                print(f"Early stopping: no better valid loss for {cfg.patience} epochs", flush=True)
        return not stop


def probe_line(probe: dict) -> str:
    te = probe["test"]
    return (
        f"Linear probe (logistic regression on the frozen pretrained features, "
        f"{probe['features']} per image, L2 {probe['l2']:g} chosen on valid): "
        f"test accuracy {te['acc']:.1%} ({te['correct']}/{te['total']}), {probe['seconds']:.0f}s"
    )


def epoch_line(epoch: int, tr: dict, raw: dict, ema: dict | None, lr: float, seconds: float) -> str:
    """The line printed after each epoch: train, valid (and the average's valid), lr, speed."""
    ema_part = f" | ema valid loss {ema['loss']:.4f} acc {ema['acc']:.1%}" if ema else ""
    return (
        f"Epoch {epoch + 1}: train loss {tr['loss']:.4f} acc {tr['acc']:.1%} | "
        f"valid loss {raw['loss']:.4f} acc {raw['acc']:.1%}{ema_part} | lr {lr:.2e} | "
        f"{tr['images_per_s']:.1f} img/s | {seconds:.0f}s"
    )


def check_input_sizes(model: nn.Module, cfg: TrainSettings, device) -> None:
    """Refuse, before training, crop sizes the network cannot take (scratch_cnn's fixed
    Linear wants 224, ViT its own image size), with the flags to change."""
    was_training = model.training
    model.eval()
    try:
        for flag, size in (("--train-crop-size", cfg.train_crop_size), ("--crop-size", cfg.crop_size)):
            try:
                with torch.no_grad():
                    model(torch.zeros(1, 3, size, size, device=device))
            except (RuntimeError, AssertionError, ValueError) as e:
                first = (str(e).splitlines() or [type(e).__name__])[0]
                raise ValueError(f"{cfg.model} cannot take {size} px inputs ({flag} {size}): {first}") from e
    finally:
        model.train(was_training)


def write_history(history: list[dict], out: Path) -> None:
    """metrics.csv, one row per epoch (metrics.json gets the same at the end)."""
    cols = [
        "epoch",
        "stage",
        "lr",
        "train_loss",
        "train_acc",
        "valid_loss",
        "valid_acc",
        "train_images_per_s",
        "seconds",
        "weights",
    ]
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for h in history:
            w.writerow(
                [
                    h["epoch"],
                    h["stage"],
                    f"{h['lr']:.6g}",
                    f"{h['train']['loss']:.6f}",
                    f"{h['train']['acc']:.6f}",
                    f"{h['valid']['loss']:.6f}",
                    f"{h['valid']['acc']:.6f}",
                    f"{h['train']['images_per_s']:.2f}",
                    f"{h['seconds']:.2f}",
                    h.get("weights", "raw"),
                ]
            )


def prepare_out(cfg: TrainSettings) -> Path | None:
    """The run folder; the last.pt to resume from, if any. An unfinished run is never
    overwritten by accident."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    last = cfg.out / "last.pt"
    if cfg.resume:
        if not last.exists():
            raise FileNotFoundError(f"nothing to resume: {last} does not exist")
        return last
    if last.exists() and not cfg.restart:
        s = torch.load(last, map_location="cpu", weights_only=True)
        if not s["finished"]:
            raise ValueError(
                f"{cfg.out} holds an unfinished run (epoch {s['epoch'] + 1} done): "
                "pass --resume to continue it or --restart to start over"
            )
    return None


def test_and_analyse(run: Run) -> dict:
    """Test the best checkpoint in one process; write metrics.json and the analysis."""
    cfg, one = run.cfg, distributed.Dist(device=run.d.device)
    model, ckpt = load_checkpoint(cfg.out / "best.pt")
    test = run.sets["test"]
    te = evaluate(
        model.to(one.device),
        loader(test, cfg.batch_size, False, cfg.workers),
        run.eval_criterion,
        one,
        collect=True,
    )
    print(f"best.pt: epoch {ckpt['epoch']}, {ckpt['weights']} weights")
    print(f"Test Loss: {te['loss']:.6f}")
    print(f"Test Accuracy: {te['acc']:.0%} ({te['correct']}/{te['total']})")
    if run.probe:
        p = run.probe["test"]
        print(
            f"Linear probe on the pretrained features: {p['acc']:.1%} ({p['correct']}/{p['total']}); "
            f"fine-tuned: {te['acc']:.1%}, {100 * (te['acc'] - p['acc']):+.1f} points"
        )
    files = []
    if cfg.analysis:
        preds = from_evaluation(te, test.samples)
        files = [str(f) for f in analyse(cfg.out, run.history, preds, run.classes)]
    te.pop("predictions")
    metrics = {
        "model": cfg.model,
        "best_epoch": ckpt["epoch"],
        "best_weights": ckpt["weights"],
        "test": te,
        "history": run.history,
        "stopped_early": len(run.history) < cfg.epochs,
        "files": files,
        "linear_probe": run.probe,
    }
    (cfg.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(
        "Wrote: "
        + ", ".join(
            str(cfg.out / n)
            for n in ("best.pt", "last.pt", "settings.yaml", "metrics.csv", "metrics.json")
            + (("probe.json",) if run.probe else ())
        )
    )
    for f in files:
        print(f"Wrote: {f}")
    return te


def run(cfg: TrainSettings) -> dict | None:
    """Train, keep the best checkpoint by validation loss, test it; returns the test metrics
    (in the main process; None in the others)."""
    d = distributed.setup()
    result = _run(cfg, d)
    # Every process leaves together, and only after success: destroying the group while
    # another process still uses it can hang, and a failed process exits without it
    # (torchrun then stops the others).
    distributed.finish(d)
    return result


def _run(cfg: TrainSettings, d: distributed.Dist) -> dict | None:
    _seed(cfg.seed)
    resume_from = prepare_out(cfg)
    r = Run(cfg, d)
    if d.main and cfg.probe and r.pretrained:
        r.probe = r.fit_probe(resuming=resume_from is not None)
    if resume_from:
        r.restore(resume_from)
    if d.main:
        save_settings(cfg, cfg.out / "settings.yaml")
        print(r.summary() + (f"; resuming after epoch {r.start_epoch}" if resume_from else ""), flush=True)
    try:
        for epoch in range(r.start_epoch, cfg.epochs):
            if not r.epoch(epoch):
                break
    except KeyboardInterrupt:
        if d.main:
            print(
                f"\nInterrupted: {len(r.history)} epochs are saved in {cfg.out / 'last.pt'}; "
                "run the same command with --resume to continue.",
                file=sys.stderr,
            )
        raise
    distributed.barrier(d)
    return test_and_analyse(r) if d.main else None


def main(argv=None):
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (WeightsUnavailable, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
