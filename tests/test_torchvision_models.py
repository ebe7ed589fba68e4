"""torchvision's classification models by name: one per family built, its head replaced,
exported through training.export and loaded back; blocks, eval presets, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from handlers.preset import EvalPreset
from models.torchvision_models import feature_blocks
from models.zoo import get_model, get_spec
from training.export import torchscript as export_mod
from training.fit import train as train_mod
from training.fit.checkpoint import checkpoint
from training.fit.optim import split_parameters

N = 3
# One per family, at the smallest input each takes (ViT's patch grid fixes 224).
FAMILIES = {
    "resnet18": 64,
    "efficientnet_v2_s": 64,
    "convnext_tiny": 64,
    "regnet_y_400mf": 64,
    "mobilenet_v3_small": 64,
    "vit_b_32": 224,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    return request.param, get_model(request.param, N).eval()


@pytest.mark.slow  # trains or exports real networks
def test_head_is_replaced_and_output_has_the_classes(family):
    name, m = family
    head = get_spec(name).head_of(m)
    linears = [x for x in getattr(m, head).modules() if isinstance(x, torch.nn.Linear)]
    assert linears[-1].out_features == N
    size = FAMILIES[name]
    with torch.inference_mode():
        out = m(torch.randn(2, 3, size, size))
    assert out.shape == (2, N) and torch.isfinite(out).all()
    head_params, backbone = split_parameters(m, head)
    assert any(p is linears[-1].weight for p in head_params)
    assert not any(p is linears[-1].weight for p in backbone) and backbone


@pytest.mark.slow  # trains or exports real networks
def test_export_round_trip(family, tmp_path):
    """training.export as a user runs it, from a checkpoint at this model's crop size."""
    name, m = family
    size = FAMILIES[name]
    a = train_mod.parse_args(
        [
            "--model",
            name,
            "--data",
            "d",
            "--out",
            str(tmp_path),
            "--weights",
            "none",
            "--resize-size",
            str(size),
            "--crop-size",
            str(size),
        ]
    )
    ckpt = checkpoint(m, a, ["a", "b", "c"], EvalPreset(size, size), 1, {"loss": 1.0})
    torch.save(ckpt, tmp_path / "best.pt")
    out = tmp_path / "export"
    export_mod.main(["--checkpoint", str(tmp_path / "best.pt"), "--out", str(out)])
    traced = torch.jit.load(str(out / "model.pt"))
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected, got = m(x), traced(x)
    # Traced and frozen graphs fuse and reorder float operations: 1e-3 of the outputs' scale,
    # the bound training.export itself checks (handlers/optimize.py RTOL).
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    cfg = yaml.safe_load((out / "model-config.yaml").read_text())["handler"]
    assert (cfg["model"], cfg["crop_size"]) == (name, size)
    assert json.loads((out / "index_to_name.json").read_text()) == {"0": "a", "1": "b", "2": "c"}


def trainable_prefixes(m) -> set[str]:
    return {n.rsplit(".", 2)[0] for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_unfreeze_blocks_trains_the_last_blocks_and_the_head():
    m = get_model("resnet18", N, unfreeze_blocks=1)
    trained = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trained == {"layer4", "fc"}
    v = get_model("vit_b_32", N, unfreeze_blocks=2)
    trained = {n for n, p in v.named_parameters() if p.requires_grad}
    assert {n.split(".")[2] for n in trained if n.startswith("encoder.layers.")} == {
        "encoder_layer_10",
        "encoder_layer_11",
    }
    assert "conv_proj.weight" not in trained and "heads.head.weight" in trained
    head_only = get_model("convnext_tiny", N, unfreeze_blocks=0)
    assert {n.split(".")[0] for n, p in head_only.named_parameters() if p.requires_grad} == {"classifier"}
    assert all(p.requires_grad for p in get_model("regnet_y_400mf", N).parameters())
    with pytest.raises(ValueError, match="unfreeze_blocks must be in 0..4 for resnet18"):
        get_model("resnet18", N, unfreeze_blocks=5)


@pytest.mark.slow
def test_feature_blocks_per_family():
    counts = {
        name: len(feature_blocks(get_model(name, N)))
        for name in ("resnet18", "regnet_y_400mf", "vit_b_32", "efficientnet_v2_s")
    }
    assert counts == {"resnet18": 4, "regnet_y_400mf": 4, "vit_b_32": 12, "efficientnet_v2_s": 8}
    assert feature_blocks(get_model("googlenet", N)) is None


def test_eval_preset_comes_from_the_weights_transforms():
    spec = get_spec("efficientnet_v2_s")
    assert spec.eval_preset_for(pretrained=True, weights="DEFAULT") == EvalPreset(384, 384)
    assert spec.eval_preset_for(pretrained=False) == EvalPreset()
    assert get_spec("resnet18").eval_preset_for(True, "IMAGENET1K_V1") == EvalPreset(256, 224)
    assert get_spec("convnext_tiny").eval_preset_for(True, "DEFAULT").resize_size == 236
    # The project's own resnet50 keeps its preprocessing, whatever torchvision's V2 weights use.
    assert get_spec("resnet50").eval_preset_for(True, "DEFAULT") == EvalPreset()
    with pytest.raises(ValueError, match="unknown weights 'V9' for resnet18; known: DEFAULT, IMAGENET1K_V1"):
        get_spec("resnet18").eval_preset_for(True, "V9")


def test_registered_names_keep_their_own_builders():
    assert [type(x).__name__ for x in get_model("resnet50", N).fc] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert get_spec("resnet50").train_preset.rotation == 10.0
    assert get_spec("resnet18").train_preset.rotation == 0.0


def test_unknown_model_and_unknown_option_say_what_is_allowed():
    with pytest.raises(
        ValueError,
        match="unknown model 'resnet5'; known: efficientnet_lite0, .*scratch_cnn, "
        "or any torchvision classification model, e.g. resnet18",
    ):
        get_spec("resnet5")
    with pytest.raises(ValueError, match="resnet18 \\(torchvision\\) takes no dropout"):
        get_model("resnet18", N, dropout=0.3)
    with pytest.raises(ValueError, match="no Linear classifier"):
        get_model("squeezenet1_0", N)


@pytest.mark.slow
def test_offline_download_names_the_weights_file_flag(tiny_data, tmp_path):
    from tests.test_models import closed_port

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
            "resnet18",
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path / "o"),
            "--weights",
            "DEFAULT",
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cannot download resnet18 weights IMAGENET1K_V1" in r.stderr and "--weights-file" in r.stderr


@pytest.mark.slow  # trains or exports real networks
def test_convnext_tiny_trains_exports_and_answers_through_the_handler(tiny_data, tmp_path):
    """A torchvision family the project has no builder for, end to end as a user runs it:
    training.fit.train --model convnext_tiny, training.export, and the served handler's answer
    (the same handler TorchServe loads) agreeing with the exported model in process."""
    from handlers.image_classifier import ImageClassifier
    from tests.conftest import Reference, answers, assert_answer_matches, make_context, split_images

    run = tmp_path / "run"
    train_mod.run(
        train_mod.parse_args(
            [
                "--model",
                "convnext_tiny",
                "--weights",
                "none",
                "--data",
                str(tiny_data),
                "--out",
                str(run),
                "--epochs",
                "1",
                "--batch-size",
                "10",
                "--workers",
                "0",
                "--resize-size",
                "72",
                "--crop-size",
                "64",
                "--no-analysis",
            ]
        )
    )
    out = tmp_path / "export"
    export_mod.main(["--checkpoint", str(run / "best.pt"), "--out", str(out), "--top-k", "3"])
    h = ImageClassifier()
    h.initialize(make_context(out, 1))
    assert (h.preset.resize_size, h.preset.crop_size) == (72, 64)
    images = [p.read_bytes() for p in split_images(tiny_data)[:3]]
    got = answers(h.handle([{"body": bytearray(b)} for b in images], make_context(out, len(images))))
    reference = Reference(out)
    for answer, image in zip(got, images):
        assert {e["label"] for e in answer["top_k"]} <= {"circle", "square", "triangle"}
        assert_answer_matches(answer, reference.expected(image))
