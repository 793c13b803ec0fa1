"""Plugin discovery through the regproxy.backbones entry-point group, built-ins and third-party alike; every
installed token classifier through the model contract."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import PLUGIN_CLASSES, tiny_model_with
from regproxy_cli import (
    RegproxyError,
    build_model,
    get_backbone,
    list_backbones,
    load_pretrained,
    refresh_backbones,
    save_pretrained,
)
from regproxy_cli.model.classifiers import list_classifiers
from regproxy_cli.model.plugins import ENTRY_POINT_GROUP, discover

PLUGIN_MODULE = textwrap.dedent(
    """
    from functools import partial
    from regproxy_cli import BackboneSpec
    from regproxy_cli.model.timm_vit import create_timm_vit

    SPEC = BackboneSpec(
        name="{name}", title="Third-party ViT", stride=16, m=1, width=32, depth=2, heads=2, num_prefix_tokens=1,
        pretrained="vit_tiny_patch16_384.augreg_in21k_ft_in1k", crop_size=64,
        factory=partial(create_timm_vit, "vit_tiny_patch16_384", stride=16, embed_dim=32, depth=2, num_heads=2),
    )
    NOT_A_SPEC = 42
    """
)


def _fake_distribution(site: Path, dist: str, module: str, entries: dict[str, str], spec_name: str) -> None:
    """What pip leaves behind for an installed package: the module and a dist-info with entry_points.txt."""
    (site / f"{module}.py").write_text(PLUGIN_MODULE.format(name=spec_name))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    refresh_backbones()
    yield site
    refresh_backbones()
    sys.modules.pop("acme_vit", None)  # each test writes its own version of the module


def test_built_ins_come_from_their_own_distribution():
    names = {name: dist for name, (dist, _) in discover(ENTRY_POINT_GROUP, "backbone").items()}
    for name in ("t16", "s16", "b16", "l16", "r26-s32", "r50-l32", "demo8"):
        assert names[name] == "regproxy-backbones"


@pytest.mark.parametrize("baseline", [False, True], ids=["regproxy", "baseline"])
@pytest.mark.parametrize("name", list_classifiers())
def test_every_installed_classifier_scores_k_classes_and_round_trips(name, baseline, tmp_path):
    model = tiny_model_with(name, baseline=baseline).eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        logits, out = model(x), model(x, training_output=True)
    assert logits.shape == out.logits.shape == (1, len(PLUGIN_CLASSES), 48, 64) and torch.isfinite(logits).all()
    assert out.outputs.shape[1] == out.token_outputs.shape[1] == model.token_classifier.out_channels
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.config.classifier == name and loaded.config.classifier_options == model.config.classifier_options
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits, rtol=0, atol=0)


def test_unknown_backbone_lists_the_available_ones():
    with pytest.raises(RegproxyError) as info:
        get_backbone("vit-huge")
    message = str(info.value)
    assert "unknown backbone 'vit-huge'" in message
    assert all(name in message for name in list_backbones())


def test_third_party_distribution_adds_a_backbone(site):
    _fake_distribution(site, "acme-vit", "acme_vit", {"acme-tiny": "acme_vit:SPEC"}, "acme-tiny")
    refresh_backbones()
    assert "acme-tiny" in list_backbones()
    model = build_model("acme-tiny", 3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 40)).shape == (1, 3, 48, 40)


def test_the_same_name_from_two_distributions_is_refused(site):
    _fake_distribution(site, "acme-vit", "acme_vit", {"s16": "acme_vit:SPEC"}, "s16")
    refresh_backbones()
    with pytest.raises(RegproxyError, match="'s16' is registered twice, by .* and .*: uninstall one"):
        list_backbones()


@pytest.mark.parametrize(
    "target, message",
    [
        ("acme_vit:NOT_A_SPEC", "is not a BackboneSpec but int"),
        ("acme_vit:MISSING", "failed to load"),
        ("acme_vit_missing_module:SPEC", "failed to load"),
        ("acme_vit:SPEC", "declares the name 'other'"),
    ],
)
def test_broken_plugins_give_clear_errors(site, target, message):
    _fake_distribution(site, "acme-vit", "acme_vit", {"acme-bad": target}, "other")
    refresh_backbones()
    with pytest.raises(RegproxyError, match=message):
        get_backbone("acme-bad")


def _pip_install(tmp_path: Path, dist: str, module: str, entry_points: str) -> Path:
    """Build the one-module distribution ``dist`` (its entry points as pyproject.toml TOML) and pip-install it into a
    folder of its own, returned for PYTHONPATH: the path a third party's plugin takes."""
    package = dist.replace("-", "_")
    project = tmp_path / dist
    (project / package).mkdir(parents=True)
    (project / package / "__init__.py").write_text(module)
    (project / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{dist}"
        version = "0.1"
    """) + textwrap.dedent(entry_points))
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--target", str(target), str(project)],
        check=True, capture_output=True,
    )
    return target


def test_pip_installed_plugin_is_found_by_the_cli(tmp_path, monkeypatch):
    """The real path: a separate distribution built and installed by pip, seen by a fresh `regproxy` process."""
    target = _pip_install(tmp_path, "acme-plugin", PLUGIN_MODULE.format(name="acme-pip"), f"""
        [project.entry-points."{ENTRY_POINT_GROUP}"]
        acme-pip = "acme_plugin:SPEC"
    """)
    env = {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200"}
    listed = subprocess.run([sys.executable, "-m", "regproxy_cli", "backbones", "--json"], env=env,
                            capture_output=True, text=True, check=True)
    by_name = {b["name"]: b for b in json.loads(listed.stdout)}
    assert by_name["acme-pip"]["width"] == 32 and "s16" in by_name
    counted = subprocess.run([sys.executable, "-m", "regproxy_cli", "flops", "-b", "acme-pip", "--size", "64", "--json"],
                             env=env, capture_output=True, text=True, check=True)
    # the installed spec built in this process, at the CLI's defaults (150 classes, 4x4 regions, its 64 crop)
    monkeypatch.syspath_prepend(str(target))
    plugin = importlib.import_module("acme_plugin")
    monkeypatch.setitem(sys.modules, "acme_plugin", plugin)  # so that teardown removes it again
    spec = plugin.SPEC
    expected = sum(p.numel() for p in build_model(spec, 150, img_size=64).parameters())
    row = json.loads(counted.stdout)[0]
    assert row["backbone"] == "acme-pip" and row["params"] == expected


HEAD_MODULE = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from regproxy_cli.engine.losses import LossSpec
    from regproxy_cli.model.classifiers import ClassifierSpec


    class CosineClassifier(nn.Module):
        def __init__(self, width, num_classes, options):
            super().__init__()
            self.out_channels = num_classes
            self.scale = options["scale"]
            self.weight = nn.Parameter(torch.randn(num_classes, width) * 0.02)

        def forward(self, tokens):
            return self.scale * F.normalize(tokens, dim=-1) @ F.normalize(self.weight, dim=-1).t()

        def class_scores(self, outputs):
            return outputs


    def options(given, classes):
        return {"scale": float(given.get("scale", 10.0))}


    class SmoothedCE:
        def __init__(self, context):
            self.context = context

        def __call__(self, output, labels, iteration):
            return F.cross_entropy(output.logits, labels, ignore_index=255, label_smoothing=0.1)


    COSINE = ClassifierSpec(name="acme-cosine", title="cosine classifier", factory=CosineClassifier,
                            resolve_options=options)
    SMOOTH = LossSpec(name="acme-smooth", title="label-smoothed CE", factory=SmoothedCE)
    """
)


def test_pip_installed_classifier_and_loss_train_save_and_reload_through_the_cli(tmp_path):
    """A separate distribution registering a token classifier and a loss: listed, trained, saved, reloaded."""
    target = _pip_install(tmp_path, "acme-head", HEAD_MODULE, """
        [project.entry-points."regproxy.classifiers"]
        acme-cosine = "acme_head:COSINE"
        [project.entry-points."regproxy.losses"]
        acme-smooth = "acme_head:SMOOTH"
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    listed = subprocess.run([sys.executable, "-m", "regproxy_cli", "plugins", "--json"], env=env,
                            capture_output=True, text=True, check=True)
    rows = {(r["kind"], r["name"]): r["distribution"] for r in json.loads(listed.stdout)}
    assert rows[("classifier", "acme-cosine")] == rows[("loss", "acme-smooth")] == "acme-head"
    assert rows[("classifier", "linear")] == rows[("loss", "hssn")] == "regproxy"
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "model": {"backbone": "tiny-vit", "pretrained": False, "classifier": "acme-cosine",
                  "classifier_options": {"scale": 12}},
        "data": {"kind": "synthetic", "root": str(tmp_path / "scenes"), "synthetic_train": 2, "synthetic_val": 1,
                 "synthetic_size": 64, "crop_size": 64, "scale": [128, 64], "workers": 0},
        "test": {"inference_mode": "whole", "test_scale": None},
        "optim": {"lr": 1e-3, "batch_size": 2, "iters": 2, "warmup_iters": 1},
        "loss": {"kind": "acme-smooth"},
        "run": {"out_dir": str(tmp_path / "run"), "eval_every": 2, "save_every": 2, "log_every": 1, "threads": 1},
    }))
    trained = subprocess.run([sys.executable, "-m", "regproxy_cli", "train", str(config)], env=env,
                             capture_output=True, text=True, check=False)
    assert trained.returncode == 0, trained.stderr
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["classifier"] == "acme-cosine" and saved["classifier_options"] == {"scale": 12.0}
    evaluated = subprocess.run([sys.executable, "-m", "regproxy_cli", "eval", "--model", str(tmp_path / "run" / "final"),
                                "--data", str(config), "--json"], env=env, capture_output=True, text=True,
                               check=False)
    assert evaluated.returncode == 0, evaluated.stderr
    assert 0 <= json.loads(evaluated.stdout)["mIoU"] <= 100
    # without the distribution the model names what is missing, in one line
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    image = next((tmp_path / "scenes").rglob("*.png"))
    missing = subprocess.run([sys.executable, "-m", "regproxy_cli", "predict", str(image), "--model",
                              str(tmp_path / "run" / "final"), "--out", str(tmp_path / "out")],
                             env=env, capture_output=True, text=True, check=False)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "unknown classifier 'acme-cosine'" in missing.stderr
