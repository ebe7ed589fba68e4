"""The handler's speed settings: threads, reduced JPEG decoding, oneDNN Graph and
optimize_for_inference, and the CUDA-only options (half, gpu_decode), whose tensor path runs on
the CPU here."""

from __future__ import annotations

import copy
import io
import logging
import shutil

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

from handlers import optimize as optimize_mod
from handlers.decode import open_image, orient_tensor
from handlers.image_classifier import ImageClassifier, set_threads
from handlers.optimize import OneDNNModel, chunk_sizes, compare, onednn_sizes, optimize_mode, optimized
from handlers.preset import EvalPreset
from handlers.settings import HandlerSettings
from tests.conftest import ONE_GREY_LEVEL, answers, make_context, photo_jpeg, png_bytes, split_images
from training.export import torchscript as export_mod

# The tensor path (decode_jpeg, antialiased resize in float, crop, normalise) against the
# eval tensor, in grey levels: PIL rounds to 8 bits between its two resampling passes and
# the tensor path does not, so a value may differ by a grey level and a rounding, half a
# level on average; a crop one pixel off or another filter moves a photo by more.
TENSOR_MAX_DIFF = 1.5 * ONE_GREY_LEVEL
TENSOR_MEAN_DIFF = 0.5 * ONE_GREY_LEVEL
# The answers of those paths against evaluation's, on the probability scale (0 to 1):
# inputs a few grey levels apart at edges and under one on average move this small
# model's probabilities far less than this; the top class must not change.
PREPROCESSING_ANSWER_TOLERANCE = 0.02


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def handler_with(exported, **settings) -> ImageClassifier:
    """A handler initialised from the export with handler settings replaced."""
    ctx = make_context(exported, 1)
    ctx.model_yaml_config = copy.deepcopy(ctx.model_yaml_config)
    ctx.model_yaml_config["handler"].update(settings)
    h = ImageClassifier()
    h.initialize(ctx)
    return h


# A checkpoint's description, as export reads it, for settings that do not need the weights.
CKPT = {"eval_preset": EvalPreset().to_dict(), "num_classes": 133, "model": "mobilenet_v2"}


def settings_of(*flags, ckpt=CKPT) -> HandlerSettings:
    """The handler settings the export writes for these flags, as the handler reads them."""
    a = export_mod.parse_args(["--checkpoint", "x", "--out", "y", *flags])
    return HandlerSettings.read(export_mod.model_config(ckpt, a)["handler"])


def test_export_writes_speed_settings(exported):
    cfg = yaml.safe_load((exported / "model-config.yaml").read_text())
    # the defaults, but for the precision that the fixture pins
    assert HandlerSettings.read(cfg["handler"]) == HandlerSettings(top_k=3, precision="fp32")
    assert cfg["handler"]["threads"] == 1 and cfg["handler"]["jpeg_draft"] == 1.25
    assert cfg["handler"]["optimize"] == "onednn"
    assert cfg["handler"]["half"] is False and cfg["handler"]["gpu_decode"] is False
    s = settings_of("--threads", "2", "--half", "--gpu-decode", "--no-optimize", "--jpeg-draft", "0")
    assert (s.threads, s.jpeg_draft, s.optimize, s.half, s.gpu_decode) == (2, 0.0, "none", True, True)


@pytest.mark.slow
def test_threads_setting_is_applied(exported):
    torch.set_num_threads(2)
    handler_with(exported, threads=1)
    assert torch.get_num_threads() == 1
    handler_with(exported, threads=2)
    assert torch.get_num_threads() == 2


def test_set_threads_twice_keeps_the_interop_pool():
    set_threads(1)
    interop = torch.get_num_interop_threads()
    set_threads(1)  # the pool is process-wide and already fixed: logged, not raised
    assert torch.get_num_interop_threads() == interop


def test_optimize_for_inference_is_checked_and_falls_back(exported, caplog):
    model = torch.jit.load(str(exported / "model.pt")).eval()
    x = torch.randn(2, 3, 224, 224)
    fast = optimized(model, x)
    assert fast is not model
    with torch.inference_mode():
        assert compare(fast(x), model(x)).ok
    eager = torch.nn.Conv2d(3, 4, 3)  # not a ScriptModule: optimize_for_inference refuses it
    with caplog.at_level(logging.WARNING):
        assert optimized(eager, x) is eager
    assert "optimize_for_inference failed" in caplog.text


@pytest.mark.slow
def test_handler_loads_the_optimized_model(exported, caplog):
    with caplog.at_level(logging.INFO, logger="handlers.optimize"):
        h = handler_with(exported, optimize=True)
    assert "optimize_for_inference applied" in caplog.text
    plain = handler_with(exported, optimize=False)
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        assert compare(h.model(x), plain.model(x)).ok


def test_optimize_modes_of_export_and_handler_agree():
    assert export_mod.OPTIMIZE_MODES is optimize_mod.OPTIMIZE_MODES
    for mode in export_mod.OPTIMIZE_MODES:
        assert settings_of("--optimize", mode).optimize == mode == optimize_mode(mode)
    # archives written before the modes said true / false
    assert optimize_mode(True) == "jit" and optimize_mode(False) == "none"
    with pytest.raises(ValueError, match="not one of"):
        optimize_mode("fast")


def test_chunk_sizes_are_powers_of_two_and_the_batch_size():
    assert chunk_sizes(1) == [1]
    assert chunk_sizes(8) == [1, 2, 4, 8]
    assert chunk_sizes(6) == [1, 2, 4, 6]


def fused_graph(model) -> str:
    with torch.inference_mode():
        model(torch.zeros(1, 3, 224, 224))
    return str(torch.jit.last_executed_optimized_graph())


def chunks_served(model: OneDNNModel, plain, n: int) -> list[int]:
    """The chunk sizes ``model`` cuts a batch of ``n`` into; its answer is checked
    against the model as loaded."""
    calls, copies = [], dict(model.copies)
    model.copies = {b: (lambda x, m=m: calls.append(len(x)) or m(x)) for b, m in copies.items()}
    try:
        x = torch.randn(n, 3, 224, 224)
        with torch.inference_mode():
            got, want = model(x), plain(x)
    finally:
        model.copies = copies
    assert got.shape == want.shape
    assert compare(got, want).ok
    return calls


@pytest.mark.slow
def test_onednn_model_serves_every_batch_size_from_fused_copies(exported, caplog):
    with caplog.at_level(logging.INFO, logger="handlers.optimize"):
        h = handler_with(exported, optimize="onednn")  # batch size 8 (make_context)
    assert "oneDNN Graph applied" in caplog.text
    assert isinstance(h.model, OneDNNModel) and sorted(h.model.copies) == [1, 2, 4, 8]
    assert "oneDNNFusionGroup" in fused_graph(h.model.copies[1])
    plain = torch.jit.load(str(exported / "model.pt")).eval()
    for n, chunks in {1: [1], 3: [2, 1], 7: [4, 2, 1], 8: [8], 11: [8, 2, 1]}.items():
        assert chunks_served(h.model, plain, n) == chunks


@pytest.mark.slow
def test_onednn_batches_choose_the_copies(exported):
    plain = torch.jit.load(str(exported / "model.pt")).eval()
    h = handler_with(exported, optimize="onednn", onednn_batches=[1])
    assert sorted(h.model.copies) == [1]
    assert chunks_served(h.model, plain, 3) == [1, 1, 1]
    h = handler_with(exported, optimize="onednn", onednn_batches=[3, 1])
    assert sorted(h.model.copies) == [1, 3]
    assert chunks_served(h.model, plain, 8) == [3, 3, 1, 1]
    # What export writes is what the handler reads.
    assert settings_of("--onednn-batches", "8", "1").onednn_batches == (1, 8)
    assert settings_of().onednn_batches is None
    with pytest.raises(SystemExit):
        export_mod.parse_args(["--checkpoint", "x", "--out", "y", "--onednn-batches", "8"])


def test_resnet50_exports_one_onednn_copy_unless_told_otherwise():
    """The registry's default for ResNet50 (as fast per image at batch 1, a quarter of the
    memory); other models keep every power of two; the export's flag wins."""
    resnet = {**CKPT, "model": "resnet50"}
    assert settings_of(ckpt=resnet).onednn_batches == (1,)
    assert settings_of().onednn_batches is None  # mobilenet_v2
    assert settings_of("--onednn-batches", "1", "2", "4", "8", ckpt=resnet).onednn_batches == (1, 2, 4, 8)


def test_onednn_batches_must_include_one():
    assert onednn_sizes(None, 8) == chunk_sizes(8)
    assert onednn_sizes(1, 8) == [1] and onednn_sizes([8, 1, 8], 8) == [1, 8]
    for bad in ([8], [0, 1], [True], ["1"], 2.0):
        with pytest.raises(ValueError, match="onednn_batches .* must be batch sizes that include 1"):
            onednn_sizes(bad, 8)


@pytest.mark.slow
def test_onednn_model_recompiles_when_the_thread_count_changes(exported):
    torch.set_num_threads(1)
    model = OneDNNModel(lambda: torch.jit.load(str(exported / "model.pt")), [2, 1], 224)
    before = dict(model.copies)
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        y1 = model(x)
        assert model.copies == before and model.threads == 1
        torch.set_num_threads(2)
        y2 = model(x)
    assert model.threads == 2 and all(model.copies[b] is not before[b] for b in (1, 2))
    assert compare(y2, y1).ok  # the same fused graph, split over another number of threads


def test_onednn_falls_back_to_optimize_for_inference_when_nothing_fuses(exported, tmp_path, caplog):
    class NoConv(torch.nn.Module):  # data movement only: nothing for oneDNN Graph to fuse
        def forward(self, x):
            return x.flatten(1)[:, :3] * 1.0

    export = tmp_path / "export"
    shutil.copytree(exported, export)
    torch.jit.freeze(torch.jit.script(NoConv().eval())).save(str(export / "model.pt"))
    with caplog.at_level(logging.INFO, logger="handlers.optimize"):
        h = handler_with(export, optimize="onednn")
    assert "oneDNN Graph failed, not used: oneDNN Graph fused nothing" in caplog.text
    assert "optimize_for_inference applied" in caplog.text
    assert not isinstance(h.model, OneDNNModel)


@pytest.mark.slow
def test_cuda_options_are_ignored_on_cpu_with_a_warning(exported, tiny_data, reference, caplog):
    with caplog.at_level(logging.WARNING):
        h = handler_with(exported, half=True, gpu_decode=True)
    assert not h.half and not h.gpu_decode
    assert "half: true ignored" in caplog.text and "gpu_decode: true ignored" in caplog.text
    path = split_images(tiny_data)[0]
    out = answers(h.handle([{"body": bytearray(path.read_bytes())}], make_context(exported, 1)))
    expected = reference.probabilities(path.read_bytes())
    assert out[0]["top_k"][0]["label"] == max(expected, key=expected.get)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_tensor_matches_exif_transpose(orientation):
    rng = np.random.default_rng(orientation)
    img = Image.fromarray(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8))
    exif = img.getexif()
    exif[0x0112] = orientation
    with_exif = Image.open(io.BytesIO(png_bytes(img, "PNG", exif=exif.tobytes())))
    want = pil_to_tensor(ImageOps.exif_transpose(with_exif))
    assert torch.equal(orient_tensor(pil_to_tensor(img), orientation), want)


def tensor_path(data: bytes, preset: EvalPreset) -> torch.Tensor:
    """gpu_decode's pipeline, on the CPU: decode_jpeg, EXIF orientation, tensor transform."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    image = torchvision.io.decode_jpeg(raw, mode=torchvision.io.ImageReadMode.RGB)
    orientation = Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
    return preset.tensor_transform(orient_tensor(image, orientation))


def test_tensor_path_is_within_tolerance_of_the_eval_tensor(tiny_data):
    preset = EvalPreset()
    images = [p.read_bytes() for p in split_images(tiny_data)[:2]]
    images += [photo_jpeg(500, 375), photo_jpeg(500, 375, orientation=6), photo_jpeg(260, 300)]
    for data in images:
        diff = (tensor_path(data, preset) - preset.transform()(open_image(data))).abs()
        assert diff.max() <= TENSOR_MAX_DIFF and diff.mean() <= TENSOR_MEAN_DIFF


@pytest.mark.slow
def test_gpu_decode_batch_falls_back_per_request(exported, tiny_data, reference):
    """gpu_decode forced on with a CPU device: JPEGs take the tensor path, a PNG the PIL
    path, a corrupt JPEG and text get their 400s, and the good answers are right."""
    h = handler_with(exported)
    h.gpu_decode = True
    jpeg = split_images(tiny_data)[0].read_bytes()
    png = png_bytes(open_image(split_images(tiny_data)[1].read_bytes()))
    data = [
        {"body": bytearray(jpeg)},
        {"body": bytearray(b"\xff\xd8\xff\xe0 not a jpeg")},
        {"data": bytearray(png)},
        {"body": "not base64!"},
    ]
    ctx = make_context(exported, 4)
    out = answers(h.handle(data, ctx))
    assert [ctx.get_response_status(i)[0] for i in range(4)] == [200, 400, 200, 400]
    assert "not a decodable image" in out[1]["message"]
    for answer, image in ((out[0], jpeg), (out[2], png)):
        expected = reference.probabilities(image)
        assert answer["top_k"][0]["label"] == max(expected, key=expected.get)
        for e in answer["top_k"]:
            assert e["probability"] == pytest.approx(expected[e["label"]], abs=PREPROCESSING_ANSWER_TOLERANCE)


@pytest.mark.slow
def test_phone_photo_answer_agrees_with_evaluation(exported, reference):
    """A 12 MP photo decoded at 1/8 scale by the handler: same top-1 as evaluation's full
    decode, probabilities close."""
    data = photo_jpeg(4032, 3024, orientation=6, seed=3)
    h = handler_with(exported)
    assert h.min_short == round(HandlerSettings.jpeg_draft * 256)
    out = answers(h.handle([{"body": bytearray(data)}], make_context(exported, 1)))
    expected = reference.probabilities(data)
    assert out[0]["top_k"][0]["label"] == max(expected, key=expected.get)
    for e in out[0]["top_k"]:
        assert e["probability"] == pytest.approx(expected[e["label"]], abs=PREPROCESSING_ANSWER_TOLERANCE)


@pytest.mark.slow
def test_initialize_moves_the_workers_objects_out_of_the_collectors_sight(exported):
    import gc

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    h = handler_with(exported)
    frozen = gc.get_freeze_count()
    gc.unfreeze()  # the rest of the test session collects as usual
    assert frozen > 10_000  # torch, the model, TorchServe's modules
    assert h.model is not None


def test_jpeg_draft_rule_is_one_definition_read_from_the_config():
    """The benchmarks and the handler decode large JPEGs down to the same short side: the
    settings' rule, with the handler's default where a config leaves jpeg_draft out."""
    assert HandlerSettings.read({}).min_short(256) == 320  # 1.25 x 256
    assert HandlerSettings.read({"jpeg_draft": 0}).min_short(256) == 0  # always in full
    assert HandlerSettings.read({"jpeg_draft": 2.0}).min_short(224) == 448
