"""The command line: help texts, and one-line errors with a non-zero exit instead of tracebacks."""

import pytest
from typer.testing import CliRunner

from regproxy_cli.cli.app import app

runner = CliRunner()


def test_top_level_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("flops", "backbones"):
        assert command in result.output


@pytest.mark.parametrize("command, expected", [
    ("flops", ["--backbone", "--size", "--classes", "--region-res", "--baseline", "--slide-image", "--json",
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
    (["flops", "-b", "vit-huge"], "error: unknown backbone 'vit-huge'; available: b16, demo8, l16, r26-s32, r50-l32, s16, t16"),
    (["flops", "-b", "s16", "--region-res", "17"], "error: region resolution '17' must be h or hxw with h, w in 1..16"),
    (["flops", "-b", "s16", "--slide-image", "big"], "error: --slide-image 'big' must be HEIGHTxWIDTH"),
    (["flops", "-b", "s16", "--classes", "0"], "error: --classes must be at least 1, got 0"),
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
