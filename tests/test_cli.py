"""The command line: every command's argv reaches the library call it stands for, help texts, the version, and
one-line errors with a non-zero exit instead of tracebacks."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from regproxy_cli import ZOO, get_backbone, list_backbones
from regproxy_cli.cli import app as app_module
from regproxy_cli.cli.app import app
from regproxy_cli.constants import VERSION
from regproxy_cli.engine.config import TrainConfig
from regproxy_cli.model.base import SegmentationModel
from regproxy_cli.model.flops import FlopCount

runner = CliRunner()
COMMANDS = ("train", "eval", "predict", "models", "convert", "export", "flops", "backbones", "benchmark", "push",
            "demo", "data", "analyze", "plugins")


def test_top_level_help_lists_every_command_with_a_whole_summary():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for command in COMMANDS:
        line = next(line for line in result.output.splitlines() if re.match(rf"\W*{command}\s", line))
        summary = line.split(command, 1)[1].strip(" │")
        assert summary.endswith((".", ")")) and summary.count("(") == summary.count(")"), (command, summary)


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"regproxy {VERSION}"


class Recorder:
    """Stands in for a library function: remembers its calls, runs ``effect`` and returns ``result``."""

    def __init__(self, result=None, effect=None):
        self.calls, self.result, self.effect = [], result, effect

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.effect is not None:
            self.effect(*args, **kwargs)
        return self.result

    @property
    def only(self):
        assert len(self.calls) == 1, self.calls
        return self.calls[0]


class FakeModel(SegmentationModel):
    def __init__(self, classes=("sky", "road")):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(classes=list(classes), crop_size=64, palette=[[0, 0, 0], [255, 255, 255]],
                                      backbone="tiny-vit", m=1, num_classes=len(classes))


def invoke(*args: str):
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_train_passes_the_config_overrides_and_resume(monkeypatch, tmp_path):
    from regproxy_cli.engine import train as train_module

    run = Recorder(tmp_path / "best")
    monkeypatch.setattr(train_module, "train", run)
    invoke("train", "configs/demo.yaml", "--set", "optim.lr=0.5", "--set", "run.out_dir=/tmp/x", "--resume",
           "--allow-config-change")
    (config,), kwargs = run.only
    assert isinstance(config, TrainConfig) and config.optim.lr == 0.5 and config.run.out_dir == "/tmp/x"
    assert config.model.backbone == "demo8" and kwargs == {"resume": True, "allow_config_change": True}
    invoke("train", "configs/demo.yaml")
    assert run.calls[1][1] == {"resume": False, "allow_config_change": False}


def test_eval_passes_every_option(monkeypatch, tmp_path):
    from regproxy_cli.engine import evaluate as engine_evaluate
    from regproxy_cli.engine import runner as engine_runner

    dataset, model = object(), FakeModel()
    opened = Recorder(dataset)
    loaded = Recorder(model)
    evaluated = Recorder({"mIoU": 50.0, "mAcc": 60.0, "aAcc": 70.0, "images": 3, "IoU": [40.0, None],
                          "Acc": [50.0, None]})
    monkeypatch.setattr(engine_evaluate, "open_eval_dataset", opened)
    monkeypatch.setattr(engine_runner, "load_model", loaded)
    monkeypatch.setattr(engine_evaluate, "evaluate", evaluated)
    result = invoke("eval", "-m", "runs/x/best", "--data", "cfg.yaml", "--split", "test", "--mode", "whole", "--tta",
                    "--device", "cpu", "--window-batch", "3", "--precision", "bf16", "--save-predictions",
                    str(tmp_path / "p"), "--json")
    assert opened.only == (("cfg.yaml", "test"), {})
    assert loaded.only == (("runs/x/best",), {"provider": "cpu"})
    (segmenter, data), options = evaluated.only
    assert segmenter is model and data is dataset
    assert options == {"mode": "whole", "tta": True, "batch_size": 3, "precision": "bf16",
                       "save_dir": tmp_path / "p", "progress": False, "report": None}
    report = json.loads(result.output)
    assert report["mIoU"] == 50.0 and report["per_class"] == {"sky": {"IoU": 40.0, "Acc": 50.0},
                                                              "road": {"IoU": None, "Acc": None}}
    # the defaults: the model's own mode, fp32, 8 windows
    invoke("eval", "-m", "m", "--data", "d")
    assert evaluated.calls[1][1] | {"save_dir": None} == {"mode": None, "tta": False, "batch_size": 8,
                                                          "precision": "fp32", "save_dir": None, "progress": True,
                                                          "report": None}


def test_predict_passes_every_option(monkeypatch, tmp_path):
    from regproxy_cli.engine import runner as engine_runner

    image = tmp_path / "a.png"
    image.write_bytes(b"")
    model = FakeModel()
    monkeypatch.setattr(engine_runner, "load_model", Recorder(model))
    files = Recorder(engine_runner.PredictReport(written=[tmp_path / "out" / "a.png"]))
    monkeypatch.setattr(engine_runner, "predict_shard", files)
    loaded = Recorder(model)
    monkeypatch.setattr(engine_runner, "load_model", loaded)
    invoke("predict", str(image), "-m", "s16-ade", "-o", str(tmp_path / "out"), "--mode", "slide", "--scale", "0.5",
           "--tta", "--regions", "--device", "cpu", "--window-batch", "2", "--precision", "bf16", "--batch", "3",
           "--format", "png", "--format", "cvat", "--polygon-tolerance", "0.5", "--regions-by", "token",
           "--confidence", "--save-probs", "--opacity", "0.3")
    assert loaded.only == (("s16-ade",), {"provider": "cpu"})
    (segmenter, paths, out), options = files.only
    assert segmenter is model and paths == [image] and out == tmp_path / "out"
    del options["progress"]
    assert isinstance(options.pop("report"), engine_runner.PredictReport)  # filled as images finish, for Ctrl-C
    assert options.pop("formats") == ["png", "cvat"]
    assert options == {"regions": True, "mode": "slide", "tta": True, "scale": 0.5, "batch_size": 2,
                       "precision": "bf16", "batch": 3, "polygon_tolerance": 0.5, "regions_by": "token",
                       "confidence": True, "save_probs": True, "opacity": 0.3}


def test_models_json_is_the_zoo():
    rows = json.loads(invoke("models", "--json").output)
    assert [(r["name"], r["miou"], r["m"], r["crop"], r["hub_revision"], r["sha256"]) for r in rows] == [
        (e.name, e.miou, e.m, e.crop, "v1", None) for e in ZOO.values()]


UNSET = {"backbone": None, "num_classes": None, "m": None, "inference_mode": None, "window_stride": None,
         "test_scale": None}


@pytest.mark.parametrize("argv, expected", [
    (["--zoo", "s16-city"], ("config", ZOO["s16-city"].config())),
    (["--backbone", "s16", "--num-classes", "19", "--m", "3"],
     ("kwargs", {**UNSET, "backbone": "s16", "num_classes": 19, "m": 3})),
    (["--mode", "slide", "--window-stride", "512", "--test-scale", "1024x2048"],
     ("kwargs", {**UNSET, "inference_mode": "slide", "window_stride": 512, "test_scale": (2048, 1024)})),
    (["--mode", "whole", "--test-scale", "2048x512"],
     ("kwargs", {**UNSET, "inference_mode": "whole", "test_scale": (2048, 512)})),
])
def test_convert_passes_the_zoo_entry_or_the_overrides(monkeypatch, tmp_path, argv, expected):
    from regproxy_cli.hub import checkpoint, convert

    model = FakeModel()
    converted = Recorder(model)
    saved = Recorder()
    monkeypatch.setattr(convert, "convert_authors_checkpoint", converted)
    monkeypatch.setattr(checkpoint, "save_pretrained", saved)
    invoke("convert", "x.pth", str(tmp_path / "out"), *argv)
    args, kwargs = converted.only
    assert args[0] == Path("x.pth")
    if expected[0] == "config":
        assert args[1] == expected[1] and kwargs == {}
    else:  # the zoo is passed along: a checkpoint without an embedded config is tested as its matching entry
        assert kwargs.pop("known") == {e.name: e.config() for e in ZOO.values()}
        assert kwargs == expected[1]
    assert saved.only == ((model, tmp_path / "out"), {})


def test_export_passes_size_batch_opset_and_static(monkeypatch, tmp_path):
    from regproxy_cli.hub import zoo
    from regproxy_cli.onnx import export as onnx_export

    model = FakeModel()
    out = tmp_path / "m.onnx"
    exported = Recorder(effect=lambda *a, **k: out.write_bytes(b"x"))
    checked = Recorder(1e-6)
    monkeypatch.setattr(zoo, "load_model", Recorder(model))
    monkeypatch.setattr(onnx_export, "export_onnx", exported)
    monkeypatch.setattr(onnx_export, "check_onnx", checked)
    invoke("export", str(out), "--model", "runs/x", "--size", "32x48", "--batch", "2", "--opset", "18", "--static")
    assert exported.only == ((model, out), {"size": (32, 48), "batch": 2, "opset": 18, "dynamic": False})
    (path, segmenter, example), _ = checked.only
    assert path == out and segmenter is model and example.shape == (2, 3, 32, 48)
    invoke("export", str(out), "--model", "runs/x", "--no-check")
    assert exported.calls[1][1] == {"size": (64, 64), "batch": 1, "opset": 17, "dynamic": True}  # the crop size
    assert len(checked.calls) == 1


def test_flops_passes_every_option(monkeypatch):
    from regproxy_cli.model import flops as flops_module

    counted = Recorder(FlopCount(params=1, true_macs=2, paper_macs=1, stem_true_macs=0, stem_paper_macs=0, windows=8))
    monkeypatch.setattr(flops_module, "count_flops", counted)
    rows = json.loads(invoke("flops", "-b", "t16", "--size", "768", "--num-classes", "19", "--region-res", "2x8",
                             "--baseline", "--slide-image", "1024x2048", "--slide-stride", "512", "--json").output)
    (spec,), options = counted.only
    assert spec.name == "t16"
    assert options == {"size": 768, "classes": 19, "region_res": (2, 8), "baseline": True,
                       "slide_image": (1024, 2048), "slide_stride": 512}
    assert rows[0]["windows"] == 8 and rows[0]["model"] == "linear baseline"


def test_backbones_json_is_every_installed_spec():
    rows = json.loads(invoke("backbones", "--json").output)
    assert [r["name"] for r in rows] == list_backbones()
    assert all(r["stride"] == get_backbone(r["name"]).stride and r["m"] == get_backbone(r["name"]).m for r in rows)


def test_plugins_lists_every_group_with_its_distribution():
    rows = json.loads(invoke("plugins", "--json").output)
    by_kind = {kind: {r["name"]: r for r in rows if r["kind"] == kind} for kind in ("backbone", "classifier", "loss")}
    assert sorted(by_kind["backbone"]) == list_backbones()
    assert {"linear", "hssn", "protoseg"} <= set(by_kind["classifier"])
    assert {"ce", "focal", "dice", "ce+dice", "lovasz", "hssn", "protoseg"} <= set(by_kind["loss"])
    assert by_kind["loss"]["hssn"]["needs_classifier"] == "hssn" and by_kind["loss"]["ce"]["needs_classifier"] is None
    assert by_kind["classifier"]["linear"]["distribution"] == "regproxy"
    table = runner.invoke(app, ["plugins"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "needs classifier protoseg" in table.output


def test_every_command_is_registered_and_tested_here():
    registered = [command.name for command in app_module.app.registered_commands]
    registered += [group.name for group in app_module.app.registered_groups]  # command groups: `data`
    assert sorted(registered) == sorted(COMMANDS)


@pytest.mark.parametrize("command, option, choices", [
    ("predict", "--mode", "whole|slide"), ("predict", "--precision", "fp32|bf16|fp16"),
    ("eval", "--mode", "whole|slide"), ("eval", "--precision", "fp32|bf16|fp16"),
])
def test_choices_are_listed_and_checked(command, option, choices):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert choices in result.output.replace(" ", "")
    argv = [command, "x.png", "-m", "m"] if command == "predict" else [command, "-m", "m", "--data", "d"]
    bad = runner.invoke(app, [*argv, option, "tiles"])
    assert bad.exit_code == 2 and "tiles" in bad.output


@pytest.mark.parametrize("command, expected", [
    ("flops", ["--backbone", "--size", "--num-classes", "--dataset", "--region-res", "--baseline", "--slide-image", "--json",
               "paper", "Examples"]),
    ("backbones", ["--json", "regproxy.backbones"]),
])
def test_subcommand_help(command, expected):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in expected:
        assert text in result.output, text


def test_backbones_table_lists_the_built_ins():
    result = runner.invoke(app, ["backbones"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for title in ("ViT-Ti/16", "ViT-S/16", "ViT-B/16", "ViT-L/16", "R26+ViT-S/32", "R50+ViT-L/32"):
        assert title in result.output
    assert "timm/deit_base_distilled_patch16_384.fb_in1k" in result.output


@pytest.mark.parametrize("args, message", [
    (["flops", "-b", "vit-huge"], "error: unknown backbone 'vit-huge'; available: b16, demo8, "),
    (["flops", "-b", "s16", "--region-res", "17"], "error: region resolution '17' must be h or hxw with h, w in 1..16"),
    (["flops", "-b", "s16", "--slide-image", "big"], "error: --slide-image 'big' must be HEIGHTxWIDTH"),
    (["flops", "-b", "s16", "--num-classes", "0"], "error: --num-classes must be at least 1, got 0"),
    (["flops", "-b", "s16", "--size", "0"], "error: input size must be positive, got 0"),
    (["flops", "-b", "s16", "--slide-image", "1024x2048", "--slide-stride", "0"], "error: sliding-window stride"),
])
def test_bad_input_is_one_line_and_exit_1(cli, args, message):
    result = cli(*args, env={"COLUMNS": "200"})
    assert result.returncode == 1
    assert result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_debug_env_shows_the_traceback(cli):
    result = cli("flops", "-b", "vit-huge", env={"REGPROXY_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_usage_errors_exit_2_without_traceback(cli):
    result = cli("flops", "--no-such-option")
    assert result.returncode == 2 and "No such option" in result.stderr and "Traceback" not in result.stderr
