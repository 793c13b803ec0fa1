"""Assembles the ``regproxy`` Typer app and maps library errors to one line and a non-zero exit."""

from __future__ import annotations

import os
import sys

import typer

from regproxy_cli.cli import backbones, convert, flops, models, predict, train
from regproxy_cli.cli import eval as eval_cli
from regproxy_cli.cli.output import err_console
from regproxy_cli.errors import RegproxyError

app = typer.Typer(
    name="regproxy",
    help="RegProxy semantic segmentation (CVPR 2022): ViT tokens as proxies of learnable regions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
app.command("train", help=train.HELP, epilog=train.EXAMPLES)(train.train)
app.command("eval", help=eval_cli.HELP, epilog=eval_cli.EXAMPLES)(eval_cli.eval_command)
app.command("predict", help=predict.HELP, epilog=predict.EXAMPLES)(predict.predict)
app.command("models", help=models.HELP)(models.models)
app.command("convert", help=convert.HELP, epilog=convert.EXAMPLES)(convert.convert)
app.command("flops", help=flops.HELP, epilog=flops.EXAMPLES)(flops.flops)
app.command("backbones", help=backbones.HELP)(backbones.backbones)


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Set REGPROXY_DEBUG=1 to see tracebacks instead of one-line errors."""
    debug = os.environ.get("REGPROXY_DEBUG", "") not in ("", "0")
    try:
        app(args=argv, prog_name="regproxy")
    except RegproxyError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", markup=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
