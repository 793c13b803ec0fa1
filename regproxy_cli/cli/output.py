"""One rich console for the CLI's human output, and the JSON writer for ``--json``."""

from __future__ import annotations

import json
import sys
from collections import Counter

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(message: object) -> None:
    """One error line on stderr; the message is text, not markup (a path or `pip install 'x[extra]'` stays whole)."""
    err_console.print(f"[bold red]error:[/] {escape(str(message))}", markup=True)


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def print_classes_present(classes: list[str], pixels: Counter, seen_in: Counter, unit: str) -> None:
    """The "Classes present" table of a predict run: each class found, in how many ``unit`` (images, frames) and
    its share of all pixels, most pixels first."""
    total = sum(pixels.values())
    table = Table(title="Classes present", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    for column in ("id", "class", unit, "pixels %"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for class_id, count in pixels.most_common():
        table.add_row(str(class_id), classes[class_id], str(seen_in[class_id]), f"{100 * count / total:.1f}")
    console.print(table)
