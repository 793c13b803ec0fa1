"""--precision int8: the backbone's linear layers in oneDNN int8 (inference/quantize.py), on tiny models.

Nothing here times anything or asserts which kernel ran: the checks are numerical closeness to fp32, that the CLI
runs the path end to end, and that every refusal is one line. A PyTorch without oneDNN's int8 ops skips the numerical
and CLI checks (with the reason) and still checks that asking for int8 there is one error line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regproxy_cli.errors import RegproxyError
from regproxy_cli.inference import quantize
from regproxy_cli.inference.quantize import Int8Linear, calibrate_int8, check_int8, int8_supported, quantize_int8

UNSUPPORTED = int8_supported()
needs_int8 = pytest.mark.skipif(UNSUPPORTED is not None, reason=f"no oneDNN int8 here: {UNSUPPORTED}")


def _tiny(classes: int = 3) -> nn.Module:
    from regproxy_cli import build_model

    torch.manual_seed(0)
    return build_model("tiny-vit", classes).eval()


def _scenes(count: int, size: int = 64, classes: int = 3, split: str = "train"):
    from regproxy_cli.data.synthetic import SyntheticScenes

    return SyntheticScenes(count, size=(size, size), num_classes=classes, seed=0, split=split)


def _trained_tiny() -> nn.Module:
    """A tiny-vit RegProxy fitted for a few seconds to generated scenes: margins like a trained model's, not noise."""
    from regproxy_cli.inference.predictor import normalise

    model = _tiny()
    scenes = _scenes(8)
    pairs = [scenes.render(i) for i in range(8)]
    x = torch.cat([normalise(image, model.config) for image, _ in pairs])
    y = torch.stack([torch.from_numpy(label.astype(np.int64)) for _, label in pairs])
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(60):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


@needs_int8
def test_an_int8_linear_is_close_to_the_float_one():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(2, 10, 64)
    with torch.inference_mode():
        want = linear(x)
        got = Int8Linear(linear)(x)
        gelu = Int8Linear(linear, gelu=True)(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() / want.abs().max() < 0.03  # 8-bit rounding of both operands
    assert (gelu - F.gelu(want)).abs().max() / want.abs().max() < 0.03


@needs_int8
def test_quantize_swaps_every_backbone_linear_and_fuses_gelu_into_fc1():
    model = _tiny()
    count = sum(type(m) is nn.Linear for m in model.backbone.modules())
    assert quantize_int8(model) == count > 0
    assert not any(type(m) is nn.Linear for m in model.backbone.modules())
    mlp = model.backbone.vit.blocks[0].mlp
    assert mlp.fc1.post_op == "gelu" and isinstance(mlp.act, nn.Identity) and mlp.fc2.post_op == "none"


@needs_int8
@pytest.mark.parametrize("calibrated", [False, True])
def test_int8_labels_agree_with_fp32_on_a_trained_tiny_model(calibrated):
    from regproxy_cli.inference.predictor import normalise, predict_labels

    model = _trained_tiny()
    int8 = _trained_tiny()
    calibration = None
    if calibrated:
        calibration = calibrate_int8(int8, [normalise(_scenes(2).render(i)[0], int8.config) for i in range(2)])
    quantize_int8(int8, calibration)
    val = _scenes(6, split="val")
    same = total = 0
    for index in range(6):
        image = val.render(index)[0]
        fp32 = predict_labels(model, image)
        labels = predict_labels(int8, image, precision="int8")
        same += int((fp32 == labels).sum())
        total += fp32.size
    assert same / total >= 0.97


def test_int8_is_cpu_only_and_one_line():
    from regproxy_cli.inference.runtime import autocast

    with pytest.raises(RegproxyError, match="CPU only") as caught:
        autocast("cuda", "int8")
    assert "\n" not in str(caught.value)
    with pytest.raises(RegproxyError, match="CPU only"):
        check_int8("cuda")


def test_a_torch_without_the_int8_ops_is_one_line(monkeypatch):
    monkeypatch.setattr(quantize, "int8_supported", lambda: "this PyTorch (0.0) has no torch.ops.onednn.qlinear_pointwise")
    with pytest.raises(RegproxyError, match="not available") as caught:
        quantize_int8(_tiny())
    assert "\n" not in str(caught.value)


@needs_int8
def test_an_int8_model_refuses_training():
    model = _tiny()
    quantize_int8(model)
    model.train()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    with pytest.raises(RegproxyError, match="inference only"):
        model(x)


def test_training_refuses_int8(tmp_path):
    from regproxy_cli.engine.config import load_config
    from regproxy_cli.engine.train import train

    config = load_config(None, ["model.backbone=tiny-vit", "run.precision=int8", f"run.out_dir={tmp_path / 'run'}"])
    with pytest.raises(RegproxyError, match="run.precision int8 is for inference"):
        train(config, progress=False)


@needs_int8
def test_benchmark_and_predict_run_int8_from_the_cli(cli, model_dir, tmp_path):
    from PIL import Image

    result = cli("benchmark", "--model", str(model_dir), "--precision", "int8", "--device", "cpu", "--size", "64",
                 "--iters", "1", "--warmup", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert '"precision": "int8"' in result.stdout
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    result = cli("predict", str(image), "--model", str(model_dir), "--precision", "int8", "--device", "cpu",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert any(out.rglob("*.png"))


def test_the_demo_opens_the_model_as_predict_does_int8_included(cli, model_dir):
    """demo --precision int8 converts the model once (open_model) and its page segments as predict's int8 does;
    fp16 on a CPU is predict's one error line."""
    pytest.importorskip("gradio")
    from regproxy_cli.engine.runner import open_model
    from regproxy_cli.inference.predictor import predict_labels
    from regproxy_cli.web import demo

    model = open_model(str(model_dir), torch.device("cpu"), precision="int8")
    image = np.random.default_rng(2).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    labels = demo.segment(model, image, "whole", "int8").labels
    assert (labels == predict_labels(model, image, mode="whole", precision="int8")).mean() > 0.99
    result = cli("demo", "--model", str(model_dir), "--device", "cpu", "--precision", "fp16", "--port", "45871")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "fp16 needs a CUDA device" in result.stderr


def test_benchmark_names_the_fastest_path_for_each_kind_of_cpu():
    from regproxy_cli.inference.benchmark import CPU_PATHS, cpu_fast_path

    assert cpu_fast_path(frozenset({"sse4_2"}))[0] == "fp32" and cpu_fast_path(frozenset())[0] == "fp32"
    assert cpu_fast_path(frozenset({"avx2", "fma"}))[0] == "int8"
    for flag, precision, _ in CPU_PATHS:
        assert cpu_fast_path(frozenset({flag, "avx512f"}))[0] == precision
    assert cpu_fast_path(frozenset({"amx_bf16", "avx512_bf16", "avx512_vnni"}))[0] == CPU_PATHS[0][1]


@pytest.mark.parametrize("flags, cap, qmax", [
    ({"avx2"}, "", 127), ({"avx2", "avx512f"}, "", 127), ({"avx2", "avx_vnni"}, "", 255),
    ({"avx512f", "avx512_vnni"}, "", 255), ({"amx_int8", "avx512_vnni"}, "avx512_core_amx", 255),
    ({"avx512f", "avx512_vnni"}, "AVX2", 127), ({"avx512f", "avx512_vnni"}, "AVX512_CORE", 127)])
def test_activations_keep_7_bits_where_int8_products_would_saturate_int16(monkeypatch, flags, cap, qmax):
    from regproxy_cli.inference import quantize
    from regproxy_cli.model import attention

    monkeypatch.setattr(attention, "cpu_info", lambda: ("cpu", frozenset(flags)))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    quantize.activation_qmax.cache_clear()
    try:
        assert quantize.activation_qmax() == qmax
        scale, zero = quantize._activation_qparams(-1.0, 3.0)
        assert zero == round(1.0 / scale) and abs(scale * qmax - 4.0) < 1e-6
    finally:
        quantize.activation_qmax.cache_clear()
