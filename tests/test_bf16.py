"""bf16: the export's bfloat16 copy, its accuracy gate, and the worker's choice of precision.

The copy runs on every CPU (emulated by oneDNN where the CPU has no bf16 units), so these
tests hold everywhere; tests/test_kernels.py runs it under other instruction sets and
tests/test_dog_breeds.py runs the dog app on real photos in both precisions.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from handlers.image_classifier import ImageClassifier
from handlers.optimize import compare
from handlers.precision import BF16_METHOD, BF16_RTOL, cpu_flags, native_bf16, resolve_precision
from tests.conftest import make_context, photo_file, with_precision
from training.export import bf16, gate
from training.export import torchscript as export_mod
from training.fit.checkpoint import load_checkpoint

CPU = torch.device("cpu")


class WithBf16Copy:
    forward_bf16 = None  # what resolve_precision looks for


def test_cpu_flags_are_read_from_cpuinfo():
    text = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\nbugs\t: x\nflags\t: other\n"
    assert cpu_flags(text) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags("processor: 0\n") == set()


@pytest.mark.parametrize(
    ("flags", "env", "native"),
    [
        ({"avx2", "avx512f"}, {}, False),  # AVX-512 without its bf16 extension
        ({"avx512_bf16"}, {}, True),  # AMD Zen 4, Intel Cooper Lake
        ({"amx_bf16", "avx512_bf16"}, {}, True),  # Intel Sapphire Rapids and later
        ({"avx512_bf16"}, {"ONEDNN_MAX_CPU_ISA": "avx2"}, False),  # oneDNN capped below bf16
        ({"amx_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True),
    ],
)
def test_auto_is_bf16_only_where_the_cpu_has_bf16_units(flags, env, native):
    assert native_bf16(flags, env)[0] is native
    assert resolve_precision("auto", WithBf16Copy(), CPU, flags, env) == ("bf16" if native else "fp32")
    # fp32 stays fp32, and bf16 as set runs everywhere (slowly where emulated)
    assert resolve_precision("fp32", WithBf16Copy(), CPU, flags, env) == "fp32"
    assert resolve_precision("bf16", WithBf16Copy(), CPU, flags, env) == "bf16"


def test_without_a_bf16_copy_or_off_the_cpu_the_worker_runs_fp32(caplog):
    native = {"amx_bf16", "avx512_bf16"}
    with caplog.at_level(logging.INFO, "handlers.precision"):
        assert resolve_precision("bf16", object(), CPU, native) == "fp32"
        assert resolve_precision("auto", WithBf16Copy(), torch.device("cuda"), native) == "fp32"
    assert "no bf16 copy" in caplog.text and "CPU setting" in caplog.text
    with pytest.raises(ValueError, match="precision 'fp16'"):
        resolve_precision("fp16", WithBf16Copy(), CPU)


@pytest.fixture(scope="module")
def bf16_export(trained, tiny_data, tmp_path_factory):
    """The tiny model exported as `make export` does (precision auto), gated on valid/."""
    out = tmp_path_factory.mktemp("bf16") / "tiny"
    a = export_mod.parse_args(["--checkpoint", str(trained), "--out", str(out), "--data", str(tiny_data)])
    export_mod.export(trained, out, a)
    return out


@pytest.mark.slow
def test_the_export_adds_a_gated_bf16_copy_and_keeps_fp32_exactly(bf16_export, exported, tiny_data):
    report = json.loads((bf16_export / bf16.REPORT_FILE).read_text())
    valid = len(list(tiny_data.glob("valid/*/*.jpg")))
    assert report["split"] == "valid" and report["images"] == valid and report["served"] is True
    assert 0 <= report["bf16_correct"] <= valid and 0 <= report["agree"] <= valid
    assert report["accuracy_drop_points"] == pytest.approx(
        100 * (report["fp32_correct"] - report["bf16_correct"]) / valid
    )
    config = export_mod.yaml.safe_load((bf16_export / export_mod.CONFIG_FILE).read_text())
    assert config["handler"]["precision"] == "auto"
    both = torch.jit.load(str(bf16_export / export_mod.MODEL_FILE))
    plain = torch.jit.load(str(exported / export_mod.MODEL_FILE))  # --precision fp32
    assert hasattr(both, BF16_METHOD) and not hasattr(plain, BF16_METHOD)
    x = torch.rand(5, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        # The plain path is the same model: the same numbers, bit for bit.
        assert torch.equal(both(x), plain(x))
        agreement = compare(getattr(both, BF16_METHOD)(x), plain(x), BF16_RTOL)
    assert agreement.ok, agreement


@pytest.mark.slow
def test_the_worker_serves_the_copy_it_is_told_to(bf16_export, tmp_path, monkeypatch):
    """bf16 as set serves the copy on every CPU; auto follows the CPU's flags, and with
    oneDNN capped below its bf16 instructions serves fp32."""
    photos = [photo_file(n).read_bytes() for n in ("chelsea", "coffee", "astronaut")]

    def handler(precision: str, folder: str) -> ImageClassifier:
        h = ImageClassifier()
        h.initialize(make_context(with_precision(bf16_export, precision, tmp_path / folder), 1))
        return h

    h16, h32 = handler("bf16", "bf16"), handler("fp32", "fp32")
    assert (h16.precision, h32.precision) == ("bf16", "fp32")
    assert handler("auto", "auto").precision == ("bf16" if native_bf16()[0] else "fp32")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert handler("auto", "auto_capped").precision == "fp32"
    x = torch.stack([h32.prepare({"body": bytearray(p)})[0] for p in photos])
    with torch.inference_mode():
        agreement = compare(h16.model(x), h32.model(x), BF16_RTOL)
    assert agreement.ok, agreement


class Offset(nn.Module):
    """The model's logits plus a constant: the same answers in fp32, but in bf16, whose
    steps at 4096 are 32 apart, every class rounds to the same logit."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) + 4096.0


@pytest.mark.slow
def test_the_gate_refuses_a_model_that_bf16_breaks(trained, tiny_data):
    model, ckpt = load_checkpoint(trained)
    preset = export_mod.EvalPreset.from_dict(ckpt["eval_preset"])
    scripted = export_mod.to_torchscript(Offset(model), preset.crop_size, bf16=True)
    result = bf16.on_split(scripted, tiny_data, preset, ckpt["classes"])
    assert result.fp32_correct > result.other_correct, result  # ties go to the first class
    assert gate.loss(result, 0.5, "--max-bf16-drop").startswith("bf16 loses")


@pytest.mark.slow
def test_a_copy_that_fails_stops_bf16_and_is_left_out_by_auto(bf16_export, trained, tiny_data, tmp_path):
    """Just below the measured drop: --precision bf16 writes nothing; auto exports fp32 only,
    says why in bf16.json, and the worker serves fp32."""
    drop = json.loads((bf16_export / bf16.REPORT_FILE).read_text())["accuracy_drop_points"]
    flags = ["--checkpoint", str(trained), "--data", str(tiny_data), "--max-bf16-drop", str(drop - 0.01)]
    refused = tmp_path / "refused"
    a = export_mod.parse_args([*flags, "--out", str(refused), "--precision", "bf16"])
    with pytest.raises(SystemExit, match="nothing written: bf16 loses"):
        export_mod.export(trained, refused, a)
    assert not refused.exists()
    out = tmp_path / "auto"
    export_mod.export(trained, out, export_mod.parse_args([*flags, "--out", str(out)]))
    report = json.loads((out / bf16.REPORT_FILE).read_text())
    assert report["served"] is False and report["why_not"].startswith("bf16 loses")
    assert not hasattr(torch.jit.load(str(out / export_mod.MODEL_FILE)), BF16_METHOD)
    config = export_mod.yaml.safe_load((out / export_mod.CONFIG_FILE).read_text())
    assert config["handler"]["precision"] == "fp32"


def test_int8_and_bf16_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        export_mod.parse_args(
            ["--checkpoint", "c", "--out", "x", "--quantize", "int8", "--data", "d"] + ["--precision", "bf16"]
        )
    assert "exclude each other" in capsys.readouterr().err
    a = export_mod.parse_args(["--checkpoint", "c", "--out", "x", "--quantize", "int8", "--data", "d"])
    assert a.precision == "fp32"


@pytest.mark.slow
def test_the_benchmark_measures_the_bf16_copy_beside_fp32(tmp_path):
    """bench.run's bf16 variant: its own served name and export folder, the random stand-in
    with the copy that training.export adds, and precision bf16 in its model-config.yaml."""
    from bench import exports as ex
    from bench.run import label

    settings = {"workers": 1, "threads": 1, "batch_size": 8, "max_batch_delay": 2, "device": "cpu"}
    name = label("flying_objects", "bf16")
    meta = ex.prepare_export(
        "flying_objects", tmp_path / "none", tmp_path, settings, ["--precision", "bf16"], served_name=name
    )
    assert name == "flying_objects_bf16" and meta["export"] == str(tmp_path / "exports" / name)
    assert meta["model_config"]["handler"]["precision"] == "bf16"
    assert ex.has_bf16_copy(tmp_path / "exports" / name / export_mod.MODEL_FILE)
    assert "no bf16 copy" not in meta["origin"]
    assert label("flying_objects", "fp32") == "flying_objects"
