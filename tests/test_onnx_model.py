"""ONNX in the loop: an exported file runs through predict_labels, evaluate, `regproxy predict` and `regproxy eval`
like the PyTorch model it came from; --provider; `regproxy export --quantize int8`."""

import json
import re
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_VIT
from regproxy_cli.cli.app import main
from regproxy_cli.cli.options import model_device
from regproxy_cli.data.open import open_dataset
from regproxy_cli.data.synthetic import SyntheticScenes, write_synthetic_dataset
from regproxy_cli.engine.evaluate import evaluate
from regproxy_cli.errors import RegproxyError
from regproxy_cli.hub.checkpoint import load_pretrained, save_pretrained
from regproxy_cli.hub.zoo import load_model
from regproxy_cli.images import load_image
from regproxy_cli.inference.predictor import normalise, predict_labels
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.model.regproxy import build_model
from regproxy_cli.onnx.export import export_onnx
from regproxy_cli.onnx.runtime import (
    META_PREFIX,
    MISSING_EXTRA,
    PROVIDERS,
    OnnxModel,
    execution_providers,
    onnx_metadata,
)

NUM_CLASSES = 5


def _train(model, dataset, steps: int = 40, batch: int = 8) -> None:
    """A few AdamW steps of class-balanced cross-entropy: labels that follow the scenes (val mIoU about 30)."""
    images = torch.cat([normalise(dataset[i][0], model.config) for i in range(len(dataset))])
    labels = torch.stack([torch.from_numpy(np.asarray(dataset[i][1], dtype=np.int64)) for i in range(len(dataset))])
    weight = labels.numel() / NUM_CLASSES / torch.bincount(labels.flatten(), minlength=NUM_CLASSES).float()
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for step in range(steps):
        first = batch * step % len(images)
        loss = F.cross_entropy(model(images[first:first + batch]), labels[first:first + batch], weight=weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny RegProxy trained a little on 64x64 synthetic scenes: its directory, its ONNX export, the dataset."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("onnx-model")
    data = write_synthetic_dataset(root / "data", num_train=16, num_val=6, size=(64, 64), num_classes=NUM_CLASSES)
    train = open_dataset("auto", data, "train")
    model = build_model(TINY_VIT, NUM_CLASSES)
    model.config = ModelConfig(backbone="tiny-vit", num_classes=NUM_CLASSES, m=1, crop_size=64, window_stride=32,
                               classes=list(train.classes), palette=[list(c) for c in train.palette],
                               mean=(110.0, 105.0, 100.0), std=(60.0, 58.0, 55.0), inference_mode="whole",
                               test_scale=None, dataset="synthetic")
    _train(model, train)
    save_pretrained(model, root / "model")
    path = export_onnx(load_pretrained(root / "model"), root / "model.onnx", size=64)
    return root / "model", path, data


def _scene(size: tuple[int, int]) -> np.ndarray:
    """An unseen synthetic scene of ``size`` (objects on a background), so the labels vary over it."""
    return SyntheticScenes(1, size, NUM_CLASSES, seed=sum(size), split="test").render(0)[0]


def test_config_and_interface_come_from_the_file(files):
    directory, path, _ = files
    pytorch, onnx_model = load_pretrained(directory), load_model(path)
    assert isinstance(onnx_model, OnnxModel) and not onnx_model.training
    assert onnx_model.config == pytorch.config  # classes, palette, mean/std, protocol: all of it
    assert next(onnx_model.parameters()).device.type == "cpu"
    assert onnx_model.to("cpu") is onnx_model and onnx_model.to(torch.device("cpu"), torch.float32) is onnx_model
    with pytest.raises(RegproxyError, match=r"^model.onnx is an ONNX model: its tensors stay on the CPU \(device cpu, "
                                            r"not cuda:1\); .*--provider\)$"):
        onnx_model.to("cuda:1")
    # forward: the file run by onnxruntime itself, as a torch tensor
    x = torch.randn(2, 3, 48, 80)
    expected = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    got = onnx_model(x)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.from_numpy(expected[0]), rtol=0, atol=0)
    assert torch.equal(onnx_model.labels(x), torch.from_numpy(expected[0]).argmax(1))


@pytest.mark.parametrize("mode, tta, size", [("whole", False, (64, 64)), ("whole", False, (75, 90)),
                                             ("slide", False, (100, 130)), ("whole", True, (40, 52)),
                                             ("slide", True, (36, 44))])
def test_labels_equal_pytorch_through_predict_labels(files, mode, tta, size):
    directory, path, _ = files
    pytorch, onnx_model = load_pretrained(directory), load_model(path)
    image = _scene(size)
    expected = predict_labels(pytorch, image, mode=mode, tta=tta, batch_size=3)
    got = predict_labels(onnx_model, image, mode=mode, tta=tta, batch_size=3)
    assert len(np.unique(expected)) >= 2  # labels vary: the comparison means something
    assert got.shape == expected.shape == size and got.dtype == expected.dtype
    # float rounding between the two runtimes may flip a tie; not more than one pixel in a thousand
    assert (got != expected).mean() <= 1e-3


def test_a_static_export_runs_in_its_batch_and_only_at_its_size(files, tmp_path):
    directory, path, _ = files
    static = load_model(export_onnx(load_pretrained(directory), tmp_path / "static.onnx", size=64, batch=2,
                                    dynamic=False))
    assert (static.fixed_batch, static.fixed_size) == (2, (64, 64))
    image = _scene((100, 130))  # 12 windows of 64x64, 3 per call: run as 2 + 1 (padded to 2)
    expected = predict_labels(load_model(path), image, mode="slide", batch_size=3)
    assert np.array_equal(predict_labels(static, image, mode="slide", batch_size=3), expected)
    with pytest.raises(RegproxyError, match=r"static.onnx was exported for 64x64 inputs only \(--static\), not "
                                            r"75x90: export it again without --static$"):
        predict_labels(static, _scene((75, 90)), mode="whole")


def test_evaluate_matches_pytorch(files):
    directory, path, data = files
    val = open_dataset("auto", data, "val")
    expected = evaluate(load_pretrained(directory), val, progress=False)
    got = evaluate(load_model(path), val, progress=False)
    assert expected["mIoU"] > 20  # the few training steps taught it something: the comparison is not 0 == 0
    assert abs(got["mIoU"] - expected["mIoU"]) < 0.05 and abs(got["aAcc"] - expected["aAcc"]) < 0.05


def _run(capsys, *args: str) -> tuple[int, str, str]:
    """``regproxy ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_and_eval_commands_run_the_file(files, capsys, tmp_path):
    directory, path, data = files
    out = tmp_path / "out"
    code, _, err = _run(capsys, "predict", str(data / "images" / "val"), "--model", str(path), "--out", str(out),
                        "--provider", "cpu")
    assert code == 0, err
    pytorch = load_pretrained(directory)
    images = sorted((data / "images" / "val").glob("*.png"))
    assert sorted(p.name for p in out.glob("val_*[0-9].png")) == [p.name for p in images]
    for image_path in images[:3]:
        with Image.open(out / image_path.name) as written:
            assert written.mode == "P"
            labels = np.asarray(written)
        assert (labels != predict_labels(pytorch, load_image(image_path))).mean() <= 1e-3
    code, stdout, err = _run(capsys, "eval", "--model", str(path), "--data", str(data), "--json")
    assert code == 0, err
    reference = evaluate(pytorch, open_dataset("auto", data, "val"), progress=False)
    assert abs(json.loads(stdout)["mIoU"] - reference["mIoU"]) < 0.05


def _missing_provider() -> tuple[str, str]:
    """A --provider this onnxruntime lacks (cuda on a CPU machine) and its onnxruntime name."""
    available = onnxruntime.get_available_providers()
    return next((name, PROVIDERS[name]) for name in ("cuda", "tensorrt", "openvino") if PROVIDERS[name] not in available)


@pytest.mark.parametrize("command, options, onnx_file, message", [
    ("predict", ["--provider", "MISSING"], True, r"error: this onnxruntime \([\d.]+\) has no MISSING_ID \(here: cpu"),
    ("eval", ["--provider", "MISSING"], True, r"error: this onnxruntime \([\d.]+\) has no MISSING_ID \(here: cpu"),
    ("predict", ["--precision", "bf16"], True, r"error: --precision bf16 needs a PyTorch model: model.onnx runs"),
    ("predict", ["--regions"], True, r"error: --regions needs a PyTorch model: model.onnx runs"),
    ("eval", ["--compile"], True, r"error: --compile needs a PyTorch model: model.onnx runs"),
    ("eval", ["--device", "cpu", "--provider", "openvino"], False,
     r"error: provider 'openvino' is for ONNX models \(\.onnx files\); \S+model is a PyTorch model"),
])
def test_provider_and_pytorch_only_options_are_one_line(files, capsys, command, options, onnx_file, message):
    directory, path, data = files
    name, ident = _missing_provider()
    options = [name if option == "MISSING" else option for option in options]
    target = [str(data / "images" / "val" / "val_00000.png")] if command == "predict" else ["--data", str(data)]
    code, _, err = _run(capsys, command, *target, *options, "--model", str(path if onnx_file else directory))
    assert code == 1
    assert re.match(message.replace("MISSING_ID", ident), err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_providers_map_to_onnxruntime_with_the_cpu_as_fallback(monkeypatch):
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: every)
    assert execution_providers("tensorrt") == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                               "CPUExecutionProvider"]
    assert execution_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert execution_providers("openvino") == ["OpenVINOExecutionProvider", "CPUExecutionProvider"]
    assert execution_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(RegproxyError, match=r"^unknown ONNX provider 'rocm': use one of cpu, openvino, cuda, tensorrt$"):
        execution_providers("rocm")


def test_device_auto_is_the_cpu_for_an_onnx_file():
    """On a GPU machine --device auto means CUDA; an .onnx model's tensors stay on the host instead."""
    assert model_device("auto", "exports/m.ONNX") == "cpu"
    assert model_device("auto", "runs/demo/best") == "auto" and model_device("cuda:1", "m.onnx") == "cuda:1"


def test_a_provider_onnxruntime_cannot_start_is_one_line(files, monkeypatch):
    """onnxruntime told to use a provider its build lacks runs on the CPU instead; that is reported, not hidden."""
    _, path, _ = files
    name, ident = _missing_provider()
    real = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [ident, *real])
    with pytest.raises(RegproxyError, match=rf"^onnxruntime could not start {ident} for \S+model.onnx \(.*{ident}.*not in "
                                            r"available provider names.*\); check the accelerator's libraries"):
        load_model(path, provider=name)


def test_a_file_without_the_config_is_one_line(files, tmp_path):
    _, path, _ = files
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(RegproxyError, match=rf"bare.onnx: its metadata has no {re.escape(META_PREFIX)}config "):
        load_model(bare)


def test_without_the_export_extra_an_onnx_model_is_one_line(files, monkeypatch):
    _, path, _ = files
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(RegproxyError) as error:
        load_model(path)
    assert str(error.value) == MISSING_EXTRA


def test_quantize_int8_writes_a_file_whose_agreement_is_printed(files, capsys, tmp_path, monkeypatch):
    directory, path, data = files
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "int8.onnx"
    code, stdout, err = _run(capsys, "export", str(out), "--model", str(directory), "--quantize", "int8",
                             "--calibration", str(data), "--calibration-images", "4")
    assert code == 0, err
    meta = onnx_metadata(out)
    assert meta["quantization"] == "int8" and json.loads(meta["config"]) == json.loads(onnx_metadata(path)["config"])
    graph = onnx.load(str(out)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # 7-bit weights (reduce_range): full-range int8 products saturate int16 on CPUs without VNNI
    weights = [w for w in map(onnx.numpy_helper.to_array, graph.initializer) if w.dtype == np.int8 and w.size > 1]
    assert weights and all(np.abs(w.astype(np.int16)).max() <= 64 for w in weights)
    int8, fp32 = load_model(out), load_model(path)
    assert int8.quantization == "int8" and int8.config == fp32.config
    # the calibration images: 4 of the val split's 6, evenly spread (0, 2, 3, 5)
    val = open_dataset("auto", data, "val")
    equal = total = 0
    for index in (0, 2, 3, 5):
        a, b = predict_labels(fp32, val[index][0]), predict_labels(int8, val[index][0])
        equal, total = equal + int((a == b).sum()), total + a.size
    agreement = float(re.search(r"agreement\s+([\d.]+)% of pixels", stdout).group(1))
    assert agreement == pytest.approx(100 * equal / total, abs=0.005)
    assert agreement > 80  # quantization kept most labels
    assert re.search(r"mIoU\s+fp32 [\d.]+, int8 [\d.]+ \([+-][\d.]+\) on the calibration images", stdout)
    assert "fp32, temporary" in stdout and f"wrote {out}" in stdout and sorted(tmp_path.iterdir()) == [out]


def test_quantize_needs_its_calibration(files, capsys, tmp_path):
    directory, _, _ = files
    code, _, err = _run(capsys, "export", str(tmp_path / "q.onnx"), "--model", str(directory), "--quantize", "int8")
    assert code == 1 and err.startswith("error: --quantize int8 and --calibration DIR go together")
    assert not (tmp_path / "q.onnx").exists()
