"""Files in and out: atomic writes (a reader, or a run killed mid-write, sees the old file or the complete new one)
and JSON documents read with one error line."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from regproxy_cli.errors import RegproxyError, one_line


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(temporary_path)`` for a file beside ``path``, then move it over ``path`` with ``os.replace``.

    The temporary file lives in the same directory (same file system, so the rename is atomic) and is removed
    if anything fails. The result gets the permissions a plain ``open(path, "w")`` would give (0666 minus the
    umask), not mkstemp's owner-only 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in ``path`` (UTF-8); a missing, unreadable or malformed file is one error line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RegproxyError(f"{path}: cannot read the JSON ({one_line(error)})") from None


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask
