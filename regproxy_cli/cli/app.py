"""Assembles the ``regproxy`` Typer app and maps library errors to one line and a non-zero exit."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from regproxy_cli.cli import backbones, flops
from regproxy_cli.errors import RegproxyError

app = typer.Typer(
    name="regproxy",
    help="RegProxy semantic segmentation (CVPR 2022): ViT tokens as proxies of learnable regions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
app.command("flops", help=flops.HELP, epilog=flops.EXAMPLES)(flops.flops)
app.command("backbones", help=backbones.HELP)(backbones.backbones)

_stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Set REGPROXY_DEBUG=1 to see tracebacks instead of one-line errors."""
    debug = os.environ.get("REGPROXY_DEBUG", "") not in ("", "0")
    try:
        app(args=argv, prog_name="regproxy")
    except RegproxyError as exc:
        if debug:
            raise
        _stderr.print(f"[bold red]error:[/] {exc}", markup=True)
        sys.exit(1)
    except KeyboardInterrupt:
        _stderr.print("interrupted")
        sys.exit(130)
