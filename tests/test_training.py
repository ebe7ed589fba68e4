"""Training, checkpoint, export and the demo data generator."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from handlers.optimize import compare
from models.zoo import get_spec
from tests.conftest import CLASSES, ctrl_c_in_epoch
from training.demo.shapes import generate
from training.fit import train as train_mod
from training.fit.checkpoint import load_checkpoint
from training.fit.settings import TrainSettings


def test_demo_data_is_deterministic_and_split(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    counts = generate(a, per_class=10, classes=("circle", "star"), seed=3, quiet=True)
    generate(b, per_class=10, classes=("circle", "star"), seed=3, quiet=True)
    generate(c, per_class=10, classes=("circle", "star"), seed=4, quiet=True)
    assert counts == {"train": 14, "valid": 4, "test": 2}
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 20
    assert {p.parts[1] for p in files} == {"circle", "star"}
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


@pytest.mark.slow
def test_training_prints_epochs_and_test_accuracy(tiny_data, tmp_path, capsys):
    a = train_mod.parse_args(
        [
            "--model",
            "scratch_cnn",
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path),
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--lr",
            "0.005",
        ]
    )
    te = train_mod.run(a)
    out = capsys.readouterr().out
    assert re.search(r"^Epoch 1: train loss [\d.]+ acc [\d.]+% \| valid loss [\d.]+ acc [\d.]+%", out, re.M)
    assert re.search(r"^Epoch 2: ", out, re.M)
    assert re.search(r"^Test Loss: \d+\.\d+$", out, re.M)
    m = re.search(r"^Test Accuracy: (\d+)% \((\d+)/(\d+)\)$", out, re.M)
    assert m and int(m.group(3)) == len(CLASSES) * 2 == te["total"]
    assert int(m.group(2)) == te["correct"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"]["correct"] == te["correct"] and len(metrics["history"]) == 2
    best = min(metrics["history"], key=lambda h: h["valid"]["loss"])
    assert metrics["best_epoch"] == best["epoch"]


@pytest.mark.slow
def test_checkpoint_describes_itself(trained, tiny_data):
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    assert ckpt["model"] == "scratch_cnn"
    assert ckpt["classes"] == sorted(CLASSES) and ckpt["num_classes"] == 3
    assert ckpt["eval_preset"]["resize_size"] == 256 and ckpt["eval_preset"]["crop_size"] == 224
    assert ckpt["args"]["data"] == str(tiny_data) and ckpt["args"]["weights"] is None
    model, _ = load_checkpoint(trained)
    assert model.classifier[-1].out_features == 3


@pytest.mark.slow
def test_export_writes_torchscript_labels_and_model_config(exported, trained):
    labels = json.loads((exported / "index_to_name.json").read_text())
    assert labels == {"0": "circle", "1": "square", "2": "triangle"}
    cfg = yaml.safe_load((exported / "model-config.yaml").read_text())
    assert cfg["batchSize"] == 8 and cfg["maxBatchDelay"] == 300
    assert cfg["minWorkers"] == cfg["maxWorkers"] == 1 and cfg["responseTimeout"] > 0
    h = cfg["handler"]
    assert (h["resize_size"], h["crop_size"], h["top_k"]) == (256, 224, 3)
    assert h["mean"] == [0.485, 0.456, 0.406] and h["std"] == [0.229, 0.224, 0.225]
    eager, _ = load_checkpoint(trained)
    traced = torch.jit.load(str(exported / "model.pt"))
    x = torch.randn(5, 3, 224, 224)  # not the traced batch size
    with torch.inference_mode():
        agreement = compare(traced(x), eager(x))
    assert agreement.ok, agreement


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_unknown_model_lists_known_ones(tiny_data, tmp_path):
    r = run_cli("training.fit.train", "--model", "resnet5", "--data", str(tiny_data), "--out", str(tmp_path))
    assert r.returncode != 0
    assert (
        "unknown model 'resnet5'; known: efficientnet_lite0, imagenet_dogs, mobilenet_v2, "
        "resnet50, scratch_cnn"
    ) in r.stderr


@pytest.mark.slow
def test_cli_missing_split_is_one_line(tmp_path, tiny_data):
    (tmp_path / "train" / "a").mkdir(parents=True)
    shutil.copy(next(tiny_data.glob("train/circle/*.jpg")), tmp_path / "train" / "a")
    r = run_cli(
        "training.fit.train",
        "--model",
        "scratch_cnn",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "valid is missing" in r.stderr


@pytest.mark.parametrize("weights", ["DEFAULT"])
@pytest.mark.slow
def test_cli_offline_weights_error_names_weights_file(tiny_data, tmp_path, weights):
    from tests.conftest import closed_port

    proxy = f"http://127.0.0.1:{closed_port()}"
    env = {
        "TORCH_HOME": str(tmp_path),
        "HTTPS_PROXY": proxy,
        "https_proxy": proxy,
        "HTTP_PROXY": proxy,
        "http_proxy": proxy,
        "PATH": "/usr/bin:/bin",
    }
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.fit.train",
            "--model",
            "mobilenet_v2",
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path / "o"),
            "--weights",
            weights,
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "--weights-file" in r.stderr


# --- The workbench: recipes, schedules, staged fine-tuning, resume, early stopping ---------

from training.data.datasets import EpochSampler, SeededSamples, class_weights, image_folder  # noqa: E402
from training.fit import distributed  # noqa: E402
from training.fit.optim import OptimSettings, lr_factor  # noqa: E402
from training.fit.recipe import RECIPES  # noqa: E402


def small_args(data, out, *extra):
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


def test_recipe_sets_defaults_flags_override_and_settings_reproduce(tmp_path, tiny_data):
    a = train_mod.parse_args(
        ["--recipe", "dog_breeds", "--data", str(tiny_data), "--out", str(tmp_path), "--lr", "0.05"]
    )
    recipe = yaml.safe_load((RECIPES / "dog_breeds.yaml").read_text())
    assert a.model == recipe["model"] == "resnet50"
    assert a.batch_size == recipe["batch-size"] and a.optimizer == recipe["optimizer"]
    assert a.lr == 0.05 != recipe["lr"]
    from training.fit.recipe import save_settings

    save_settings(a, tmp_path / "settings.yaml")
    b = train_mod.parse_args(["--recipe", str(tmp_path / "settings.yaml")])
    assert dataclasses.replace(b, recipe=None) == dataclasses.replace(a, recipe=None)


def test_every_flag_is_a_setting_and_every_setting_a_flag():
    dests = {x.dest for x in train_mod.build_parser()._actions if x.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(TrainSettings)}
    # and the optimiser's settings are the trainer's, under the same names
    assert {f.name for f in dataclasses.fields(OptimSettings)} <= dests


@pytest.mark.slow
def test_recipe_unknown_setting_is_named(tmp_path, tiny_data):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: scratch_cnn\nlearning-rate: 0.1\n")
    r = run_cli("training.fit.train", "--recipe", str(bad), "--data", str(tiny_data), "--out", str(tmp_path))
    assert r.returncode == 2 and "unknown setting 'learning-rate'" in r.stderr and "lr" in r.stderr


def test_every_recipe_sets_each_of_its_values():
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert {"dog_breeds", "flying_objects", "modern", "finetune"} <= set(names)
    for name in names:
        recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
        a = train_mod.parse_args(["--recipe", name, "--data", "d", "--out", "o"])
        get_spec(a.model)  # a model the registry builds
        for key, value in recipe.items():
            got = getattr(a, key.replace("-", "_"))
            if key == "weights" and str(value).lower() == "none":
                value = None  # the parser's spelling of random initialisation
            assert (list(got) if isinstance(got, tuple) else got) == value, (name, key)
        assert a.crop_size <= a.resize_size


def test_lr_schedules_by_hand():
    a = OptimSettings(warmup_epochs=2, schedule="cosine", epochs=6, min_lr_factor=0.0, gamma=0.5, step_size=2)
    got = [round(lr_factor(e, a), 4) for e in range(6)]
    # warm-up 1/3, 2/3; then cosine over 4 epochs: 1, cos-half points 0.8536, 0.5, 0.1464
    assert got == [0.3333, 0.6667, 1.0, 0.8536, 0.5, 0.1464]
    a = dataclasses.replace(a, schedule="step")
    assert [lr_factor(e, a) for e in range(2, 7)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_epoch_sampler_processes_together_see_the_single_process_batches():
    one = EpochSampler(30, shuffle=True, seed=3)
    one.set_epoch(2)
    single = list(one)
    ranks = []
    for r in range(2):
        s = EpochSampler(30, shuffle=True, seed=3, rank=r, world=2)
        s.set_epoch(2)
        ranks.append(list(s))
    for k in range(3):  # global batch 10 = 5 per process
        assert sorted(ranks[0][5 * k : 5 * k + 5] + ranks[1][5 * k : 5 * k + 5]) == sorted(
            single[10 * k : 10 * k + 10]
        )
    one.set_epoch(3)
    assert list(one) != single and sorted(one) == list(range(30))


def test_balanced_sampler_and_class_weights_on_imbalanced_data(tmp_path):
    generate(tmp_path, per_class=10, classes=("circle", "star"), seed=1, quiet=True)
    for f in sorted((tmp_path / "train" / "star").glob("*.jpg"))[2:]:
        f.unlink()  # 7 circles, 2 stars
    ds = image_folder(tmp_path, "train", None)
    assert [round(w, 4) for w in class_weights(ds).tolist()] == [round(9 / 14, 4), round(9 / 4, 4)]
    from training.data.datasets import sample_weights

    s = EpochSampler(len(ds), shuffle=True, weights=sample_weights(ds))
    drawn = []
    for e in range(200):
        s.set_epoch(e)
        drawn += [ds.targets[i] for i in s]
    share = drawn.count(1) / len(drawn)
    assert 0.45 < share < 0.55  # 2/9 = 0.22 without the sampler


def test_augmentation_depends_on_seed_epoch_and_index_only(tiny_data):
    from handlers.preset import EvalPreset

    t = get_spec("scratch_cnn").train_preset.transform(EvalPreset())
    ds = SeededSamples(image_folder(tiny_data, "train", t), seed=0)
    x1, _ = ds[(3, 1)]
    torch.rand(5)  # global generator state must not matter
    x2, _ = ds[(3, 1)]
    x3, _ = ds[(3, 2)]
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def weights_of(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_staged_fine_tuning_trains_the_head_first(tiny_data, tmp_path):
    from models.zoo import get_model

    init = get_model("scratch_cnn", 3).state_dict()
    a = small_args(tiny_data, tmp_path, "--epochs", "1", "--head-epochs", "1")
    train_mod.run(a)
    w1 = weights_of(tmp_path)
    torch.manual_seed(0)
    init = get_model("scratch_cnn", 3).state_dict()  # the run's own initial weights (seed 0)
    assert all(torch.equal(w1[k], init[k]) for k in init if k.startswith("features."))
    assert not torch.equal(w1["classifier.5.weight"], init["classifier.5.weight"])
    a = small_args(tiny_data, tmp_path, "--epochs", "2", "--head-epochs", "1", "--resume")
    train_mod.run(a)
    w2 = weights_of(tmp_path)
    assert not torch.equal(w2["features.0.weight"], init["features.0.weight"])
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [h["stage"] for h in history] == [1, 2]


@pytest.mark.slow
def test_backbone_lr_is_scaled_for_pretrained_weights(tiny_data, tmp_path):
    import torchvision

    wf = tmp_path / "w.pt"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), wf)  # stands in for ImageNet weights
    a = train_mod.parse_args(
        [
            "--recipe",
            "flying_objects",
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path / "o"),
            "--weights-file",
            str(wf),
            "--lr",
            "0.002",
        ]
    )
    r = train_mod.Run(a, distributed.Dist())
    lrs = {g["name"]: g["lr"] for g in r.optimizer.param_groups}
    assert lrs == {"head": 0.002, "backbone": 0.002 * a.backbone_lr_scale}
    assert a.backbone_lr_scale < 1
    # the backbone tensors are those of the last unfreeze-blocks blocks
    names = {n for n, p in r.model.named_parameters() if any(p is q for q in r.backbone)}
    assert {n.split(".")[1] for n in names} == {str(i) for i in range(19 - a.unfreeze_blocks, 19)}


@pytest.mark.slow
def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_data, tmp_path):
    straight = tmp_path / "straight"
    train_mod.run(small_args(tiny_data, straight, "--epochs", "3", "--schedule", "cosine"))
    broken = tmp_path / "broken"
    with ctrl_c_in_epoch(3), pytest.raises(KeyboardInterrupt):
        train_mod.run(small_args(tiny_data, broken, "--epochs", "3", "--schedule", "cosine"))
    with pytest.raises(ValueError, match="unfinished run .*--resume"):
        train_mod.run(small_args(tiny_data, broken, "--epochs", "3", "--schedule", "cosine"))
    train_mod.run(small_args(tiny_data, broken, "--epochs", "3", "--schedule", "cosine", "--resume"))
    a, b = weights_of(straight), weights_of(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((straight / "metrics.json").read_text())["history"]
    hb = json.loads((broken / "metrics.json").read_text())["history"]
    assert [h["valid"]["loss"] for h in ha] == [h["valid"]["loss"] for h in hb]
    assert [h["lr"] for h in hb] == pytest.approx([0.005, 0.005 * 0.75, 0.005 * 0.25])


@pytest.mark.slow
def test_early_stopping_and_metrics_files(tiny_data, tmp_path):
    # lr 0: the valid loss never improves after epoch 1, so patience 1 stops after epoch 2.
    train_mod.run(small_args(tiny_data, tmp_path, "--epochs", "5", "--lr", "0", "--patience", "1"))
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert len(m["history"]) == 2 and m["stopped_early"] is True
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,stage,lr,train_loss") and len(rows) == 3
    assert yaml.safe_load((tmp_path / "settings.yaml").read_text())["patience"] == 1


@pytest.mark.parametrize(
    "options,optimizer,lrs",
    [
        # plateau: the first epoch always improves on nothing, so the rate stays.
        (
            [
                "--optimizer",
                "adamw",
                "--schedule",
                "plateau",
                "--label-smoothing",
                "0.1",
                "--balance",
                "weights",
            ],
            torch.optim.AdamW,
            [0.005, 0.005],
        ),
        # one warm-up epoch at half the rate, then the step schedule's first step at the full rate.
        (
            [
                "--optimizer",
                "sgd",
                "--schedule",
                "step",
                "--step-size",
                "1",
                "--balance",
                "sampler",
                "--warmup-epochs",
                "1",
            ],
            torch.optim.SGD,
            [0.0025, 0.005],
        ),
    ],
    ids=["adamw", "sgd"],
)
@pytest.mark.slow
def test_option_combinations_train(tiny_data, tmp_path, options, optimizer, lrs):
    a = small_args(tiny_data, tmp_path, "--epochs", "2", *options)
    r = train_mod.Run(a, distributed.Dist())
    assert type(r.optimizer) is optimizer
    assert r.criterion.label_smoothing == (0.1 if "--label-smoothing" in options else 0.0)
    te = train_mod.run(a)
    assert te["total"] == 6
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [h["lr"] for h in history] == pytest.approx(lrs)
    s = yaml.safe_load((tmp_path / "settings.yaml").read_text())
    assert s["optimizer"] == options[1] and s["schedule"] == options[3]
