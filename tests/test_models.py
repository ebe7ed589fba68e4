"""Models by name: shapes, freezing, TorchScript round trip, weights loading."""

from __future__ import annotations

import pytest
import torch
from torchvision import models as tvm

from handlers.optimize import RTOL, compare
from models.weights import WeightsUnavailable
from models.zoo import get_model, get_spec, list_models
from tests.conftest import closed_port
from training.export.torchscript import to_torchscript

# Tests costing over about 2 s are marked slow one by one (make test-fast leaves them out).

N = 3


def test_registry_lists_the_models():
    assert list_models() == ["efficientnet_lite0", "imagenet_dogs", "mobilenet_v2", "resnet50", "scratch_cnn"]


def test_unknown_model_names_the_known_ones():
    with pytest.raises(
        ValueError,
        match="unknown model 'resnet5'; known: efficientnet_lite0, imagenet_dogs, mobilenet_v2, "
        "resnet50, scratch_cnn",
    ):
        get_model("resnet5", N)


@pytest.fixture(scope="module", params=["efficientnet_lite0", "mobilenet_v2", "resnet50", "scratch_cnn"])
def model(request):
    torch.manual_seed(0)
    m = get_model(request.param, N)
    # BatchNorm statistics of inputs, as training leaves them: with the initial ones (mean 0,
    # variance 1) a random network answers every image alike, and a comparison of answers
    # proves little.
    norms = [b for b in m.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]
    for b in norms:
        b.reset_running_stats()
        b.momentum = None  # a plain average over the batches below
    with torch.no_grad():
        for seed in range(2):
            m(torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(100 + seed)))
    return request.param, m.eval()


@pytest.mark.slow
def test_each_image_gets_its_own_answer(model):
    """A batch answers each image as it would alone (no statistics shared across the batch,
    as a BatchNorm using the batch's would), and different images get different answers."""
    name, m = model
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = m(x)
        alone = torch.cat([m(x[i : i + 1]) for i in range(3)])
    assert out.shape == (3, N)
    # Another batch size may pick other kernels: RTOL of the logits' scale (handlers.optimize).
    assert compare(out, alone).ok, f"{name}: {compare(out, alone)}"
    tol = RTOL * out.abs().max()
    for i in range(3):
        for j in range(i):
            assert (out[i] - out[j]).abs().max() > tol, (name, i, j)


@pytest.mark.slow
def test_torchscript_matches_eager(model, tmp_path):
    name, m = model
    path = tmp_path / "m.pt"
    to_torchscript(m).save(str(path))
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        agreement = compare(torch.jit.load(str(path))(x), m(x))
    assert agreement.ok, f"{name}: {agreement}"


def trainable(m) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in m.named_parameters()}


def test_resnet50_freezes_conv1_to_layer3():
    t = trainable(get_model("resnet50", N))
    for prefix in ("conv1.", "bn1.", "layer1.", "layer2.", "layer3."):
        assert not any(v for k, v in t.items() if k.startswith(prefix)), prefix
    for prefix in ("layer4.", "fc."):
        assert all(v for k, v in t.items() if k.startswith(prefix)), prefix
    head = get_model("resnet50", N).fc
    assert [type(x).__name__ for x in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (2048, 512, N)


def test_resnet50_unfreeze_layer3():
    t = trainable(get_model("resnet50", N, unfreeze_layer3=True))
    assert all(v for k, v in t.items() if k.startswith("layer3."))
    assert not any(v for k, v in t.items() if k.startswith("layer2."))


def test_mobilenet_v2_freezes_features():
    m = get_model("mobilenet_v2", N)
    assert not any(p.requires_grad for p in m.features.parameters())
    assert all(p.requires_grad for p in m.classifier.parameters())
    linears = [x for x in m.classifier if isinstance(x, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(1280, 256), (256, N)]
    m2 = get_model("mobilenet_v2", N, unfreeze_blocks=2)
    assert [any(p.requires_grad for p in b.parameters()) for b in m2.features][-3:] == [False, True, True]


def test_frozen_parameters_do_not_change_in_a_training_step():
    torch.manual_seed(0)
    m = get_model("mobilenet_v2", N).train()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(m(torch.randn(4, 3, 224, 224)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    for n, p in m.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == p.requires_grad, n


def test_scratch_cnn_is_the_original_baseline():
    m = get_model("scratch_cnn", N)
    convs = [x for x in m.features if isinstance(x, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 16, (3, 3), (1, 1)),
        (16, 32, (3, 3), (1, 1)),
        (32, 64, (3, 3), (1, 1)),
    ]
    fcs = [x for x in m.classifier if isinstance(x, torch.nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in fcs] == [(64 * 28 * 28, 500), (500, N)]
    assert not get_spec("scratch_cnn").pretrained
    with pytest.raises(ValueError, match="no pretrained weights"):
        get_model("scratch_cnn", N, weights="DEFAULT")


def test_weights_file_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(123)
    source = tvm.mobilenet_v2()
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(source.state_dict(), path)
    m = get_model("mobilenet_v2", N, weights_file=str(path))
    assert torch.equal(m.features[0][0].weight, source.features[0][0].weight)
    assert torch.equal(m.features[18][0].weight, source.features[18][0].weight)


def test_weights_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(tvm.resnet18().state_dict(), path)
    with pytest.raises(WeightsUnavailable, match="is not a mobilenet_v2 state dict"):
        get_model("mobilenet_v2", N, weights_file=str(path))
    with pytest.raises(WeightsUnavailable, match="no such file"):
        get_model("mobilenet_v2", N, weights_file=str(tmp_path / "missing.pth"))


def test_unknown_weights_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="IMAGENET1K_V2"):
        get_model("resnet50", N, weights="IMAGENET_V9")


def test_offline_download_gives_one_clear_error(tmp_path, monkeypatch):
    # A real download attempt through torchvision's weights API, made to fail the way an
    # offline machine does: an empty cache and a proxy that refuses connections.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    proxy = f"http://127.0.0.1:{closed_port()}"
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(WeightsUnavailable) as e:
        get_model("mobilenet_v2", N, weights="DEFAULT")
    msg = str(e.value)
    assert "--weights-file" in msg and "IMAGENET1K_V2" in msg and "\n" not in msg


@pytest.mark.slow
def test_imagenet_head_reproduces_the_pretrained_classifier(tmp_path):
    torch.manual_seed(7)
    pretrained = tvm.resnet50().eval()
    path = tmp_path / "resnet50.pth"
    torch.save(pretrained.state_dict(), path)
    m = get_model("resnet50", N, weights_file=str(path), imagenet_head=True).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        logits, imagenet = m(x)
        assert logits.shape == (2, N)
        # The branch runs the same operators on the same weights: equal but for rounding.
        assert compare(imagenet, pretrained(x)).ok
        both = get_model(
            "resnet50", N, weights_file=str(path), imagenet_head=True, unfreeze_layer3=True
        ).eval()
        assert both.shared == 2 and compare(both(x)[1], pretrained(x)).ok
    # Fine-tuning layer4 does not move the ImageNet branch.
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    torch.nn.functional.cross_entropy(m(x)[0], torch.tensor([0, 1])).backward()
    opt.step()
    m.eval()
    assert not torch.equal(m.model.layer4[0].conv1.weight, pretrained.layer4[0].conv1.weight)
    assert torch.equal(m.imagenet_stages[0][0].conv1.weight, pretrained.layer4[0].conv1.weight)
    # It survives TorchScript export, both outputs.
    ts_path = tmp_path / "m.pt"
    to_torchscript(m).save(str(ts_path))
    with torch.inference_mode():
        agreement = compare(torch.jit.load(str(ts_path))(x), m(x))
    assert agreement.ok, agreement


@pytest.mark.slow
def test_export_is_immune_to_the_stale_builtin_ids_that_break_scripting():
    """torch.jit.script looks Python values up in a table of builtins keyed by id(); the ids
    of operators that torch.library replaced stay in it, so an attribute allocated at such
    a freed address is taken for a builtin ("builtin cannot be used as a value"), about one
    export in ten. Here the collision is made on purpose: scripting fails, the export's
    tracing does not."""
    from torch.jit import _builtins

    m = get_model("mobilenet_v2", N).eval()
    padding = m.features[0][0]._reversed_padding_repeated_twice
    table = _builtins._get_builtin_table()
    table[id(padding)] = "quantized_decomposed::quantize_per_tensor"
    try:
        with pytest.raises(RuntimeError, match="builtin cannot be used as a value"):
            torch.jit.script(m)
        traced = to_torchscript(m)
    finally:
        del table[id(padding)]
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert compare(traced(x), m(x)).ok


@pytest.mark.slow
def test_twenty_exports_in_a_row():
    """Fresh networks, fresh addresses: scripting failed 2 of 20 in such a loop once
    training.export (which imports the quantisation stack) was imported."""
    import training.export.quantize  # noqa: F401 - registers the operators whose ids go stale

    x = torch.randn(1, 3, 224, 224)
    for i in range(20):
        m = get_model("mobilenet_v2", N).eval()
        with torch.inference_mode():
            assert compare(to_torchscript(m)(x), m(x)).ok, i
