"""Assembles the ``regproxy`` Typer app and maps library errors to one line and a non-zero exit.

Command modules import their libraries (torch, numpy and the package code on them) inside the commands that use
them, loading at import only what registering a command needs (option Enums, defaults, help texts), so
`regproxy --help` and ``--engine ray``'s driver start without torch."""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Annotated

import typer

from regproxy_cli.cli import analyze as analyze_cli
from regproxy_cli.cli import backbones, benchmark, convert, demo, export, flops, models, plugins, predict, push, train
from regproxy_cli.cli import data as data_cli
from regproxy_cli.cli import eval as eval_cli
from regproxy_cli.cli.output import console, err_console, print_error
from regproxy_cli.constants import VERSION
from regproxy_cli.errors import RegproxyError

app = typer.Typer(
    name="regproxy",
    help="RegProxy semantic segmentation (CVPR 2022): ViT tokens as proxies of learnable regions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _unwrap(text: str) -> str:
    """Help texts are wrapped in the source; let the terminal wrap them (paragraphs stay)."""
    return re.sub(r"(?<!\n)\n(?!\n)", " ", text)


def _register(name: str, module, function) -> None:
    """A command whose module says what it does: SUMMARY (one line, for the command list), HELP and EXAMPLES."""
    app.command(name, help=_unwrap(module.HELP), short_help=module.SUMMARY,
                epilog=getattr(module, "EXAMPLES", None))(function)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"regproxy {VERSION}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """RegProxy semantic segmentation (CVPR 2022): ViT tokens as proxies of learnable regions."""


_register("train", train, train.train)
_register("eval", eval_cli, eval_cli.eval_command)
_register("predict", predict, predict.predict)
_register("models", models, models.models)
_register("convert", convert, convert.convert)
_register("export", export, export.export)
_register("flops", flops, flops.flops)
_register("backbones", backbones, backbones.backbones)
_register("plugins", plugins, plugins.plugins)
_register("push", push, push.push)
_register("benchmark", benchmark, benchmark.benchmark)
app.add_typer(data_cli.app, name="data", help=_unwrap(data_cli.HELP), short_help=data_cli.SUMMARY)
_register("demo", demo, demo.demo)
app.add_typer(analyze_cli.app, name="analyze", help=analyze_cli.HELP, short_help=analyze_cli.SUMMARY)


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Set REGPROXY_DEBUG=1 to see tracebacks instead of one-line errors."""
    debug = os.environ.get("REGPROXY_DEBUG", "") not in ("", "0")
    if not debug:  # a warning is one line too, without the source line that raised it
        warnings.formatwarning = _one_line_warning
    try:
        app(args=argv, prog_name="regproxy")
    except RegproxyError as exc:
        if debug:
            raise
        print_error(exc)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
