"""``regproxy backbones``: the installed backbone plugins."""

from __future__ import annotations

from rich.table import Table

from regproxy_cli.cli.options import JsonOption
from regproxy_cli.cli.output import console, print_json

SUMMARY = "List the installed backbone plugins and what they declare."
HELP = "List installed backbone plugins (entry-point group regproxy.backbones) and what they declare."


def backbones(
    as_json: JsonOption = False,
) -> None:
    from regproxy_cli.model.plugins import get_backbone, list_backbones

    specs = [get_backbone(name) for name in list_backbones()]
    if as_json:
        fields = ("name", "title", "stride", "m", "width", "depth", "heads", "num_prefix_tokens", "pretrained", "crop_size")
        print_json([{f: getattr(s, f) for f in fields} for s in specs])
        return
    table = Table(title="Installed backbones")
    for column in ("name", "backbone", "stride", "M", "width", "depth", "heads", "prefix", "crop", "starts from"):
        table.add_column(column, justify="left" if column in ("name", "backbone", "starts from") else "right")
    for s in specs:
        table.add_row(
            s.name, s.title, str(s.stride), str(s.m), str(s.width), str(s.depth), str(s.heads),
            str(s.num_prefix_tokens), str(s.crop_size), f"timm/{s.pretrained}" if s.pretrained else "none (from scratch)",
        )
    console.print(table)
