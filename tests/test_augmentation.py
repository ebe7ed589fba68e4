"""Augmentation as settings, the modern recipe's parts (mixup/cutmix, EMA, no decay on norms
and biases, train resolution) and images of extreme shape, through the real trainer."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import yaml
from PIL import Image
from torchvision import transforms as T

from handlers.preset import EvalPreset
from models.augment import TrainPreset
from tests.conftest import ctrl_c_in_epoch
from training.data import clean
from training.data.datasets import MAX_ASPECT, SkippedImage, image_folder
from training.evaluation import analysis
from training.fit import distributed
from training.fit import train as train_mod
from training.fit.mixing import BatchMix
from training.fit.optim import build_optimizer, split_parameters


def args(data, out, *extra):
    return train_mod.parse_args(
        [
            "--model",
            "scratch_cnn",
            "--data",
            str(data),
            "--out",
            str(out),
            "--batch-size",
            "10",
            "--workers",
            "0",
            "--lr",
            "0.005",
            "--no-analysis",
            *extra,
        ]
    )


@pytest.mark.slow  # trains or exports real networks
def test_recipe_turns_the_flip_off_and_settings_yaml_says_so(tiny_data, tmp_path):
    recipe = tmp_path / "no_flip.yaml"
    recipe.write_text("model: scratch_cnn\nweights: none\nhflip: 0\nepochs: 1\nbatch-size: 10\n")
    a = train_mod.parse_args(
        [
            "--recipe",
            str(recipe),
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path / "run"),
            "--workers",
            "0",
            "--no-analysis",
        ]
    )
    train_mod.run(a)
    settings = yaml.safe_load((tmp_path / "run" / "settings.yaml").read_text())
    assert settings["hflip"] == 0
    # Unset keys are the architecture's own, written out: scratch_cnn's rotation and crop.
    assert settings["rotation"] == 15.0 and settings["crop-scale"] == [0.5, 1.0]
    steps = [type(t) for t in train_mod.train_preset(a).transform(EvalPreset()).transforms]
    assert T.RandomHorizontalFlip not in steps and T.RandomRotation in steps
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["train_preset"]["hflip"] == 0


def test_unset_augmentation_is_the_architectures_own_and_flags_override(tmp_path):
    base = ["--data", "d", "--out", str(tmp_path), "--weights", "none"]
    r50 = train_mod.parse_args(["--model", "resnet50", *base])
    assert (r50.rotation, r50.hflip, r50.crop_scale, r50.color_jitter) == (10.0, 0.5, (0.5, 1.0), 0.0)
    mnv2 = train_mod.parse_args(["--model", "mobilenet_v2", *base, "--rotation", "3"])
    assert (mnv2.rotation, mnv2.color_jitter) == (3.0, 0.2)
    r18 = train_mod.parse_args(["--model", "resnet18", *base])  # torchvision's own preset
    assert (r18.rotation, r18.crop_scale, r18.auto_augment) == (0.0, (0.08, 1.0), "none")
    assert (r18.resize_size, r18.crop_size, r18.train_crop_size) == (256, 224, 224)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--hflip", "1.5"], "hflip is a probability in 0..1"),
        (["--crop-scale", "0.9", "0.5"], "0 < min <= max <= 1"),
        (["--crop-size", "300"], "--crop-size 300 is larger than --resize-size 256"),
        (["--mixup-alpha", "-1"], "alphas must be >= 0"),
    ],
)
def test_impossible_augmentation_is_refused_with_what_is_allowed(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        train_mod.parse_args(["--model", "scratch_cnn", "--data", "d", "--out", str(tmp_path), *flags])
    assert message in capsys.readouterr().err


def test_every_step_of_the_preset_can_be_switched_on():
    t = TrainPreset(
        rotation=0,
        hflip=0,
        color_jitter=0.3,
        auto_augment="trivialaugment",
        random_erasing=0.25,
        crop_size=48,
        scale=(0.3, 0.9),
        ratio=(0.5, 2.0),
    ).transform(EvalPreset())
    kinds = [type(s) for s in t.transforms]
    assert kinds == [
        T.RandomResizedCrop,
        T.ColorJitter,
        T.TrivialAugmentWide,
        T.ToTensor,
        T.Normalize,
        T.RandomErasing,
    ]
    crop, jitter, _, _, norm, erase = t.transforms
    assert crop.size == (48, 48) and crop.scale == (0.3, 0.9) and crop.ratio == (0.5, 2.0)
    # Each setting reaches its step with its value: jitter of 0.3 on brightness, contrast
    # and saturation; erasing with probability 0.25; the eval preset's mean and std.
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.7, 1.3)
    assert erase.p == 0.25
    assert (tuple(norm.mean), tuple(norm.std)) == (tuple(EvalPreset().mean), tuple(EvalPreset().std))
    # A flat picture stays flat through crop, flip and rotation; with no jitter, no
    # TrivialAugment and no erasing, its normalised values are the colour's, exactly.
    plain = TrainPreset(rotation=0, hflip=0, crop_size=48).transform(EvalPreset())
    x = plain(Image.new("RGB", (80, 60), (90, 120, 30)))
    want = (torch.tensor([90, 120, 30]) / 255 - torch.tensor(EvalPreset().mean)) / torch.tensor(
        EvalPreset().std
    )
    assert x.shape == (3, 48, 48)
    assert torch.allclose(x, want[:, None, None].expand(3, 48, 48), atol=1e-6)  # float rounding


@pytest.mark.slow
def test_train_crop_size_changes_training_resolution_only(tiny_data, tmp_path):
    a = train_mod.parse_args(
        [
            "--model",
            "resnet18",
            "--weights",
            "none",
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path),
            "--workers",
            "0",
            "--resize-size",
            "72",
            "--crop-size",
            "64",
            "--train-crop-size",
            "48",
        ]
    )
    r = train_mod.Run(a, distributed.Dist())
    assert r.sets["train"][0][0].shape == (3, 48, 48)
    assert r.sets["valid"][0][0].shape == (3, 64, 64)
    assert r.eval_preset == EvalPreset(72, 64)


def test_a_model_that_cannot_take_the_crop_size_is_refused_before_training(tiny_data, tmp_path):
    a = args(tiny_data, tmp_path, "--train-crop-size", "128")
    with pytest.raises(ValueError, match="scratch_cnn cannot take 128 px inputs \\(--train-crop-size 128\\)"):
        train_mod.Run(a, distributed.Dist())


def test_batch_mix_depends_on_seed_epoch_and_step_only():
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mix = BatchMix(3, mixup_alpha=0.2, cutmix_alpha=1.0, prob=1.0, seed=4)
    x1, y1 = mix(x, y, epoch=2, step=5)
    torch.rand(7)  # the global generator's state must not matter
    x2, y2 = mix(x, y, epoch=2, step=5)
    x3, _ = mix(x, y, epoch=2, step=6)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert y1.shape == (6, 3) and torch.allclose(y1.sum(1), torch.ones(6))
    assert (y1 > 0).sum(1).max() == 2  # each image is two images' mixture
    x0, y0 = BatchMix(3, mixup_alpha=0.2, prob=0.0)(x, y, 0, 1)
    assert x0 is x and y0 is y


def mixed_by(x: torch.Tensor, out: torch.Tensor) -> str:
    """Which of the two mixed a batch with itself rolled by one: CutMix pastes a box of the
    other image (every pixel is one image's or the other's), Mixup blends every value. A
    weight of 0 or 1 (no box, a full box, a Beta draw at its end) cannot be told apart."""
    mine = (out == x).all(1).float().mean()
    other = (out == x.roll(1, 0)).all(1).float().mean()
    if mine == 1 or other == 1:
        return "neither"
    return "cutmix" if mine + other == 1 else "mixup"


@pytest.mark.parametrize(
    "switch_prob,want", [(0.0, {"mixup"}), (1.0, {"cutmix"}), (0.5, {"mixup", "cutmix"})]
)
def test_the_switch_picks_cutmix_with_its_probability_and_mixup_otherwise(switch_prob, want):
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    mix = BatchMix(3, mixup_alpha=0.2, cutmix_alpha=1.0, prob=1.0, switch_prob=switch_prob, seed=1)
    picks = [mixed_by(x, mix(x, y, epoch=0, step=s)[0]) for s in range(200)]
    assert set(picks) - {"neither"} == want and picks.count("neither") < 20
    if switch_prob == 0.5:
        # 200 fair draws: 100 +- 7 (one standard deviation); 65..135 is five of them.
        assert 65 <= picks.count("cutmix") <= 135, picks.count("cutmix")


@pytest.mark.slow
def test_the_modern_recipe_reaches_training(tiny_data, tmp_path):
    """Its mixup, cutmix, EMA, TrivialAugment and 176 px are what a run trains with."""
    a = train_mod.parse_args(
        ["--recipe", "modern", "--data", str(tiny_data), "--out", str(tmp_path), "--workers", "0"]
    )
    r = train_mod.Run(a, distributed.Dist())
    assert r.mix.mixup.alpha == 0.2 and r.mix.cutmix.alpha == 1.0
    assert (r.mix.prob, r.mix.switch_prob) == (1.0, 0.5)
    train_steps = r.sets["train"].transform.transforms
    assert any(isinstance(t, T.TrivialAugmentWide) for t in train_steps)
    assert r.sets["train"][0][0].shape == (3, 176, 176)
    assert r.sets["valid"][0][0].shape == (3, 224, 224)
    # The EMA's decay, read off one update: the first copies, the next keeps 0.98 of it.
    before = {k: v.clone() for k, v in r.ema.module.state_dict().items()}
    r.ema.update_parameters(r.model)
    with torch.no_grad():
        for p in r.model.parameters():
            p.add_(1.0)
    r.ema.update_parameters(r.model)
    name, w = next((k, v) for k, v in r.model.state_dict().items() if k.endswith("weight"))
    # One float32 rounding of a product of weights of order 1.
    assert torch.allclose(r.ema.module.state_dict()[name], 0.98 * before[name] + 0.02 * w, atol=1e-6)


def test_norms_and_biases_are_not_decayed(tmp_path):
    a = train_mod.parse_args(
        [
            "--model",
            "resnet18",
            "--weights",
            "none",
            "--data",
            "d",
            "--out",
            str(tmp_path),
            "--weight-decay",
            "0.1",
            "--norm-bias-decay",
            "0",
            "--lr",
            "1",
        ]
    )
    torch.manual_seed(0)
    from models.zoo import get_model

    m = get_model("resnet18", 3)
    head, backbone = split_parameters(m, "fc")
    opt = build_optimizer(head, backbone, a.optim, 1.0, m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)  # a step with no gradient: only weight decay moves a weight
    opt.step()
    for n, p in m.named_parameters():
        exempt = p.ndim == 1  # in resnet18 exactly the biases and BatchNorm scales and shifts
        assert torch.equal(p, before[n]) == exempt, n
    assert {g["name"] for g in opt.param_groups} == {"head", "backbone"}


@pytest.mark.slow  # trains or exports real networks
def test_resume_with_mixup_cutmix_and_ema_equals_an_uninterrupted_run(tiny_data, tmp_path, capsys):
    extra = ("--epochs", "2", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--ema-decay", "0.5")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train_mod.run(args(tiny_data, straight, *extra))
    assert "ema valid loss" in capsys.readouterr().out
    with ctrl_c_in_epoch(2), pytest.raises(KeyboardInterrupt):
        train_mod.run(args(tiny_data, broken, *extra))
    train_mod.run(args(tiny_data, broken, *extra, "--resume"))
    sa, sb = (torch.load(d / "last.pt", weights_only=True) for d in (straight, broken))
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])
    # The average followed every step of both epochs (30 images, batches of 10), in both
    # runs: it is neither the initial weights nor a copy of the last ones.
    assert sa["ema"]["n_averaged"].item() == 2 * 3 == sb["ema"]["n_averaged"].item()
    torch.manual_seed(0)  # the runs' own initial weights (seed 0)
    from models.zoo import get_model

    init = get_model("scratch_cnn", 3).state_dict()
    for k, w in init.items():
        if w.is_floating_point():
            assert not torch.equal(sa["ema"][f"module.{k}"], w), k
            assert not torch.equal(sa["ema"][f"module.{k}"], sa["model"][k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, broken))
    assert [h["valid_ema"]["loss"] for h in ma["history"]] == [h["valid_ema"]["loss"] for h in mb["history"]]
    best = min(ma["history"], key=lambda h: h["valid"]["loss"])
    assert ma["best_weights"] == best["weights"] in ("ema", "raw")
    assert best["valid"] == best[f"valid_{best['weights']}"]


def strip_png(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 40)).save(path)
    return path


@pytest.mark.slow  # trains or exports real networks
def test_extreme_shapes_are_skipped_by_training_and_analysis_and_reported_by_clean(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    strips = [
        strip_png(data / "train" / "circle" / "strip.png", (1, 100_000)),
        strip_png(data / "valid" / "square" / "strip.png", (100_000, 1)),
        strip_png(data / "test" / "triangle" / "strip.png", (1, 100_000)),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        te = train_mod.run(
            train_mod.parse_args(
                [
                    "--model",
                    "scratch_cnn",
                    "--data",
                    str(data),
                    "--out",
                    str(tmp_path / "run"),
                    "--epochs",
                    "1",
                    "--batch-size",
                    "10",
                    "--workers",
                    "0",
                ]
            )
        )
    skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedImage)]
    for s in strips:
        assert any(str(s) in m and f"over {MAX_ASPECT}:1" in m for m in skipped), s
    assert te["total"] == 6  # the test strip is not counted
    assert (tmp_path / "run" / "confusion_matrix.png").stat().st_size > 0
    with pytest.warns(SkippedImage, match="test/triangle/strip.png"):
        analysis.main(["--run", str(tmp_path / "run"), "--data", str(data), "--workers", "0"])
    found = {p.path: p.kind for p in clean.find_problems(data)}
    assert {k: v for k, v in found.items() if v == "extreme_aspect"} == {
        "train/circle/strip.png": "extreme_aspect",
        "valid/square/strip.png": "extreme_aspect",
        "test/triangle/strip.png": "extreme_aspect",
    }


def test_the_bound_is_the_aspect_ratio_not_the_size(tmp_path):
    strip_png(tmp_path / "train" / "a" / "wide_ok.png", (20 * 30, 30))
    strip_png(tmp_path / "train" / "a" / "too_wide.png", (20 * 30 + 1, 30))
    strip_png(tmp_path / "train" / "a" / "big.png", (3000, 2000))
    with pytest.warns(SkippedImage, match="too_wide.png: 601x30 px"):
        ds = image_folder(tmp_path, "train", None)
    assert sorted(p.rsplit("/", 1)[1] for p, _ in ds.samples) == ["big.png", "wide_ok.png"]
    assert len(ds.targets) == 2
