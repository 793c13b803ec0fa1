"""ONNX export: logits match PyTorch at any batch and size, static shapes are enforced, metadata round-trips,
and `regproxy export` works end to end with one-line errors."""

import json
import sys

import onnx
import onnxruntime
import pytest
import torch

from conftest import TINY_HYBRID, TINY_VIT
from regproxy_cli.cli.app import main
from regproxy_cli.errors import RegproxyError
from regproxy_cli.hub.checkpoint import save_pretrained
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.model.regproxy import build_model
from regproxy_cli.onnx.export import check_onnx, export_onnx
from regproxy_cli.onnx.runtime import MISSING_EXTRA, onnx_metadata, onnx_session

TOLERANCE = 1e-4
# batch 2 from a batch-1 export; the stored 4x4 token grid; non-square; not multiples of the stride
SHAPES = [(1, 3, 64, 64), (2, 3, 64, 64), (1, 3, 80, 112), (2, 3, 50, 37)]


@pytest.fixture(scope="module", params=["regproxy", "baseline"])
def exported(request, tmp_path_factory):
    """A tiny ViT model with a custom config, in training mode, exported (dynamic) at its stored grid."""
    torch.manual_seed(0)
    baseline = request.param == "baseline"
    model = build_model(TINY_VIT, 3, baseline=baseline)
    model.config = ModelConfig(backbone="tiny-vit", num_classes=3, m=1, baseline=baseline, crop_size=64,
                               classes=["sky", "road", "car"], mean=(120.0, 110.0, 100.0), std=(60.0, 55.0, 50.0),
                               inference_mode="whole", test_scale=None, dataset="demo")
    path = export_onnx(model.train(), tmp_path_factory.mktemp("onnx") / "nested" / "model.onnx", size=64,
                       opset=17 if baseline else 18)
    return model, path


def _onnxruntime_logits(path, x: torch.Tensor) -> torch.Tensor:
    """The exported file run by onnxruntime directly, with none of regproxy's helpers."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def _pytorch_logits(model, x: torch.Tensor) -> torch.Tensor:
    """``model.eval()(x)``, the caller's training mode restored (the module-scoped fixture checks it)."""
    was_training = model.training
    try:
        with torch.no_grad():
            return model.eval()(x)
    finally:
        model.train(was_training)


def _assert_onnx_matches_pytorch(path, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    got, expected = _onnxruntime_logits(path, x), _pytorch_logits(model, x)
    assert expected.shape == (x.shape[0], model.num_classes, *x.shape[-2:])
    # non-trivial logits: not all equal, varying over pixels and classes
    assert expected.std() > 1e-3 and expected.std(dim=(-2, -1)).min() > 0 and expected.std(dim=1).max() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE)
    return got, expected


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_logits_match_pytorch_at_any_batch_and_size(exported, shape):
    model, path = exported
    _assert_onnx_matches_pytorch(path, model, torch.randn(*shape))


def test_check_onnx_reports_the_largest_difference(exported):
    model, path = exported
    x = torch.randn(2, 3, 50, 37)
    got, expected = _assert_onnx_matches_pytorch(path, model, x)
    difference = (got - expected).abs().max().item()
    assert check_onnx(path, model, x) == pytest.approx(difference, abs=1e-6)
    assert model.training  # check_onnx restores the caller's mode too


def test_export_keeps_training_mode_and_axes_are_dynamic(exported):
    model, path = exported
    assert model.training  # exported in eval mode, the caller's mode restored
    image = onnx_session(path).get_inputs()[0]
    assert image.name == "image" and image.shape == ["batch", 3, "height", "width"]
    assert onnx_session(path).get_outputs()[0].name == "logits"
    expected = 17 if model.config.baseline else 18
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")] == [expected]


def test_metadata_round_trips(exported):
    model, path = exported
    meta = onnx_metadata(path)
    assert ModelConfig.from_dict(json.loads(meta["config"])) == model.config
    assert json.loads(meta["mean"]) == [120.0, 110.0, 100.0] and json.loads(meta["std"]) == [60.0, 55.0, 50.0]
    assert json.loads(meta["classes"]) == ["sky", "road", "car"]
    assert meta["dynamic_axes"] == "batch,height,width" and json.loads(meta["export_shape"]) == [1, 3, 64, 64]


def test_hybrid_exports_with_dynamic_shapes(tmp_path):
    model = build_model(TINY_HYBRID, 2)
    path = export_onnx(model, tmp_path / "hybrid.onnx", size=64)  # the stored grid
    # one check (a session on its full-size ResNet stem takes seconds): batch 2, sides not multiples of 32
    _assert_onnx_matches_pytorch(path, model, torch.randn(2, 3, 70, 45))


def test_static_export_accepts_only_its_shape(tmp_path):
    model = build_model(TINY_VIT, 3).eval()
    path = export_onnx(model, tmp_path / "static.onnx", size=(48, 80), batch=2, dynamic=False)
    assert onnx_session(path).get_inputs()[0].shape == [2, 3, 48, 80]
    assert onnx_metadata(path)["dynamic_axes"] == "none"
    _assert_onnx_matches_pytorch(path, model, torch.randn(2, 3, 48, 80))
    with pytest.raises(RegproxyError, match=r"takes inputs of shape 2x3x48x80, not 1x3x48x80: .*without --static"):
        check_onnx(path, model, torch.randn(1, 3, 48, 80))


def test_session_threads(exported):
    _, path = exported
    assert onnx_session(path).get_session_options().intra_op_num_threads == torch.get_num_threads()
    assert onnx_session(path, threads=1).get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize("call, message", [
    (lambda m, d: export_onnx(m, d / "a.onnx", opset=16), "ONNX opset 16 is not supported: use 17 to 20"),
    (lambda m, d: export_onnx(m, d / "a.onnx", size=(0, 64)), "export size must be two positive integers"),
    (lambda m, d: export_onnx(m, d), "is a directory: give the .onnx file to write"),
    (lambda m, d: onnx_session(d / "missing.onnx"), "missing.onnx: no such ONNX file"),
])
def test_bad_arguments_are_one_line(tmp_path, call, message):
    with pytest.raises(RegproxyError, match=message):
        call(build_model(TINY_VIT, 3), tmp_path)


def test_missing_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(RegproxyError) as error:
        export_onnx(build_model(TINY_VIT, 3), tmp_path / "a.onnx")
    assert str(error.value) == MISSING_EXTRA == "ONNX export needs the 'export' extra: pip install 'regproxy[export]'"


def test_cli_exports_and_checks_a_model_directory(tmp_path, cli):
    save_pretrained(build_model(TINY_VIT, 3), tmp_path / "model")
    out = tmp_path / "model.onnx"
    result = cli("export", str(out), "--model", str(tmp_path / "model"), "--size", "64x80", "--device", "cpu",
                 env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "max |ONNX - PyTorch|" in result.stdout and "1x3x64x80" in result.stdout and "MiB" in result.stdout
    assert f"wrote {out}" in result.stdout
    assert json.loads(onnx_metadata(out)["config"])["backbone"] == "tiny-vit"


def _run_main(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["{tmp}/a.onnx", "--model", "{tmp}/nowhere"], "error: {tmp}/nowhere: no such file or directory"),
    (["{model}/config.json/a.onnx", "--model", "{model}"], "error: cannot create "),
    (["{tmp}", "--model", "{model}"], "is a directory: give the .onnx file to write"),
    (["{tmp}/a.onnx", "--model", "{model}", "--size", "big"], "error: --size 'big' must be N or HEIGHTxWIDTH"),
    (["{tmp}/a.onnx", "--model", "{model}", "--opset", "21"], "error: ONNX opset 21 is not supported"),
    (["{tmp}/a.onnx", "--model", "{model}", "--device", "tpu"], "error: --device tpu: "),
])
def test_cli_errors_are_one_line(tmp_path, model_dir, capsys, args, message):
    code, err = _run_main(capsys, "export", *(a.format(tmp=tmp_path, model=model_dir) for a in args))
    assert code == 1 and message.format(tmp=tmp_path) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_fails_when_the_check_fails(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("regproxy_cli.onnx.export.check_onnx", lambda *args: 3e-3)
    code, err = _run_main(capsys, "export", str(model_dir.parent / "a.onnx"), "--model", str(model_dir), "--size", "32")
    assert code == 1
    expected = (f"error: ONNX logits differ from PyTorch's by 3.00e-03 > 0.0001; {model_dir.parent / 'a.onnx'} was "
                "written but should not be trusted")
    assert err.strip().splitlines() == [expected]
