"""One rich console for the CLI's human output, and the JSON writer for ``--json``."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(message: object) -> None:
    """One error line on stderr; the message is text, not markup (a path or `pip install 'x[extra]'` stays whole)."""
    err_console.print(f"[bold red]error:[/] {escape(str(message))}", markup=True)


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
