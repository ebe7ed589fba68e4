"""int8 export (training/export/quantize.py, training/export/torchscript.py --quantize int8) and serving it:
the accuracy guard, the handler's engine and device handling, and a real TorchServe."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from handlers.image_classifier import ImageClassifier
from handlers.optimize import compare
from serving.archive import build_archive
from serving.server import LocalServer
from tests.conftest import (
    CLASSES,
    MODEL_NAME,
    Reference,
    answers,
    assert_answer_matches,
    make_context,
    split_images,
)
from training.export import quantize
from training.export import torchscript as export_mod

# int8 against fp32, relative to the logits' scale: 8-bit activations hold each layer's
# values in 256 steps of its observed range, a rounding of a fraction of a percent per
# layer that stays within a few percent through this small network; a wrong scale or zero
# point moves the outputs by a large part of their scale. The top class must agree
# wherever fp32 leads by more than twice this.
INT8_RTOL = 0.1

INT8_NAME = MODEL_NAME + "_int8"


def int8_args(trained, out, data, *extra) -> list[str]:
    return [
        "--checkpoint",
        str(trained),
        "--out",
        str(out),
        "--top-k",
        "3",
        "--quantize",
        "int8",
        "--calibration-data",
        str(data),
        "--calibration-images",
        "16",
        *extra,
    ]


@pytest.fixture(scope="module")
def int8_export(trained, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / INT8_NAME
    a = export_mod.parse_args(int8_args(trained, out, tiny_data, "--max-accuracy-drop", "100"))
    export_mod.export(trained, out, a)
    return out


def test_int8_export_is_quantised_and_reports_its_accuracy(int8_export, exported, tiny_data):
    model = torch.jit.load(str(int8_export / "model.pt"))
    assert "quantized::" in str(model.inlined_graph)
    assert "quantized::" not in str(torch.jit.load(str(exported / "model.pt")).inlined_graph)
    cfg = yaml.safe_load((int8_export / "model-config.yaml").read_text())
    assert cfg["handler"]["quantized_engine"] == quantize.DEFAULT_ENGINE
    report = json.loads((int8_export / export_mod.QUANTIZATION_FILE).read_text())
    tests = len(split_images(tiny_data))
    assert report["images"] == tests and report["calibration_images"] == 16
    assert 0 <= report["agree"] <= tests
    assert report["accuracy_drop_points"] == pytest.approx(
        100 * (report["fp32_correct"] - report["int8_correct"]) / tests
    )
    # int8 stays close to the fp32 model it came from, on the test images together (the
    # scale is the logits' over the split: int8 quantises each layer over its whole range).
    fp32, int8 = Reference(exported), Reference(int8_export)
    images = [path.read_bytes() for path in split_images(tiny_data)]
    agreement = compare(
        torch.stack([int8.logits(i) for i in images]),
        torch.stack([fp32.logits(i) for i in images]),
        rtol=INT8_RTOL,
    )
    assert agreement.ok, str(agreement)


def measured_drop(export_dir) -> float:
    """The int8 export's accuracy drop in points, from its counts as the guard computes it."""
    r = json.loads((export_dir / export_mod.QUANTIZATION_FILE).read_text())
    return 100.0 * (r["fp32_correct"] - r["int8_correct"]) / r["images"]


# Below the measured drop by far less than one test image's worth of points (100 / images)
# and far more than float rounding: the guard's comparison must see it as below.
JUST_BELOW = 1e-6


def test_accuracy_guard_stops_the_export_just_below_the_drop_and_writes_nothing(
    int8_export, trained, tiny_data, tmp_path
):
    """Calibration is seeded, so this export measures the drop the fixture's did."""
    drop = measured_drop(int8_export)
    out = tmp_path / "refused"
    # "=": a negative limit in scientific notation would read as an option of its own.
    a = export_mod.parse_args(
        int8_args(trained, out, tiny_data, f"--max-accuracy-drop={drop - JUST_BELOW!r}")
    )
    with pytest.raises(SystemExit, match="nothing written") as e:
        export_mod.export(trained, out, a)
    assert f"loses {drop:.1f} points" in str(e.value)
    assert not out.exists()


def test_accuracy_guard_lets_the_measured_drop_itself_through(int8_export, trained, tiny_data, tmp_path):
    """The limit is inclusive: a drop equal to --max-accuracy-drop is exported."""
    drop = measured_drop(int8_export)
    out = tmp_path / "at_limit"
    a = export_mod.parse_args(int8_args(trained, out, tiny_data, f"--max-accuracy-drop={drop!r}"))
    export_mod.export(trained, out, a)
    assert measured_drop(out) == drop
    assert "quantized::" in str(torch.jit.load(str(out / "model.pt")).inlined_graph)


class Negated(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return -self.model(x)


def test_the_default_limit_refuses_an_int8_model_that_answers_wrong(
    int8_export, trained, tiny_data, tmp_path, monkeypatch
):
    """An int8 model whose logits come out negated (as a sign error in a scale would make
    them) meets the export's default --max-accuracy-drop, and nothing is written."""
    r = json.loads((int8_export / export_mod.QUANTIZATION_FILE).read_text())
    # Negated, the top class is fp32's lowest: right at most where fp32 is wrong, so the
    # model loses at least 2 x fp32_correct - images test images, each 100 / images points.
    assert 2 * r["fp32_correct"] > r["images"], f"the tiny model is too poor for this test: {r}"
    real = quantize.quantize_int8
    monkeypatch.setattr(quantize, "quantize_int8", lambda *args, **kw: Negated(real(*args, **kw)))
    out = tmp_path / "refused"
    a = export_mod.parse_args(int8_args(trained, out, tiny_data))  # no --max-accuracy-drop
    with pytest.raises(SystemExit, match="nothing written") as e:
        export_mod.export(trained, out, a)
    assert "--max-accuracy-drop 1.0)" in str(e.value)
    assert not out.exists()


def test_int8_needs_calibration_data_of_the_models_classes(trained, tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_mod.parse_args(["--checkpoint", str(trained), "--out", str(tmp_path), "--quantize", "int8"])
    assert "--calibration-data" in capsys.readouterr().err
    from training.demo.shapes import generate

    other = tmp_path / "other"
    generate(other, per_class=6, classes=CLASSES[:2], seed=2, quiet=True)
    a = export_mod.parse_args(int8_args(trained, tmp_path / "out", other))
    with pytest.raises(ValueError, match="give the dataset the model was trained on"):
        export_mod.export(trained, tmp_path / "out", a)


def test_handler_sets_the_engine_and_serves_int8(int8_export, tiny_data):
    torch.backends.quantized.engine = "x86" if quantize.DEFAULT_ENGINE != "x86" else "onednn"
    h = ImageClassifier()
    h.initialize(make_context(int8_export, 1))
    assert torch.backends.quantized.engine == quantize.DEFAULT_ENGINE
    assert "quantized::" in str(h.model.inlined_graph)
    good = split_images(tiny_data)[0]
    ctx = make_context(int8_export, 2)
    out = answers(h.handle([{"body": bytearray(good.read_bytes())}, {"body": bytearray(b"nope")}], ctx))
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [200, 400]
    assert_answer_matches(out[0], Reference(int8_export).expected(good.read_bytes()))


def test_handler_refuses_an_unknown_engine(int8_export):
    ctx = make_context(int8_export, 1)
    ctx.model_yaml_config["handler"]["quantized_engine"] = "no_such_engine"
    with pytest.raises(RuntimeError, match="no_such_engine"):
        ImageClassifier().initialize(ctx)


@pytest.mark.torchserve
def test_int8_archive_on_a_real_torchserve(int8_export, tiny_data, tmp_path):
    """Its own server and model store: the session's server and store stay as other tests expect."""
    store = tmp_path / "model_store"
    build_archive(int8_export, INT8_NAME, store)
    with LocalServer(store, tmp_path / "torchserve", {"load_models": ""}) as server:
        server.register(f"{INT8_NAME}.mar")
        ref = Reference(int8_export)
        for path in split_images(tiny_data)[:3]:
            answer = server.predict(INT8_NAME, path.read_bytes())
            assert_answer_matches(answer, ref.expected(path.read_bytes()))


def test_benchmark_runs_the_builtin_handler_on_the_same_int8_kernels(int8_export, tmp_path):
    """make bench-int8: the built-in handler's archive sets the export's engine before loading."""
    import zipfile

    from bench import exports as ex

    archives = ex.build_archives(INT8_NAME, int8_export, tmp_path)
    assert "quantized engine onednn" in archives["builtin_handler"]
    with zipfile.ZipFile(tmp_path / archives["builtin"]) as z:
        source = z.read("builtin_adjusted.py").decode()
    namespace: dict = {}
    exec(
        compile(
            source.replace(
                "from ts.torch_handler.image_classifier import ImageClassifier",
                "ImageClassifier = type('ImageClassifier', (), {'initialize': lambda self, context: None})",
            ),
            "h",
            "exec",
        ),
        namespace,
    )
    handler = namespace["BuiltinAdjusted"]()
    torch.backends.quantized.engine = "x86"
    handler.initialize(None)
    assert torch.backends.quantized.engine == quantize.DEFAULT_ENGINE
    assert handler.topk == len(CLASSES)  # fewer than the built-in's fixed 5
