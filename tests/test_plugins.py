"""Backbone discovery through the regproxy.backbones entry-point group, built-ins and third-party alike."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from regproxy_cli import RegproxyError, build_model, get_backbone, list_backbones, refresh_backbones
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
    for name in ("t16", "s16", "b16", "l16", "r26-s32", "r50-l32"):
        assert names[name] == "regproxy-backbones"


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


def test_pip_installed_plugin_is_found_by_the_cli(tmp_path, monkeypatch):
    """The real path: a separate distribution built and installed by pip, seen by a fresh `regproxy` process."""
    project = tmp_path / "acme-plugin"
    (project / "acme_plugin").mkdir(parents=True)
    (project / "acme_plugin" / "__init__.py").write_text(PLUGIN_MODULE.format(name="acme-pip"))
    (project / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "acme-plugin"
        version = "0.1"
        [project.entry-points."{ENTRY_POINT_GROUP}"]
        acme-pip = "acme_plugin:SPEC"
    """))
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--target", str(target), str(project)],
        check=True, capture_output=True,
    )
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
