"""Files in and out: atomic writes (a reader, or a run killed mid-write, sees the old file or the complete new one),
JSON documents read with one error line, and the check that keeps names taken from files inside the folder they
are meant for."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
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


def leaves(relative: str) -> bool:
    """Whether a relative name from a file (an archive member, a list line, a JSON path) would leave its folder:
    absolute (``/x``, ``C:\\x``, ``\\\\host\\x``), climbing (a ``..`` part) or holding a NUL byte."""
    text = relative.replace("\\", "/")
    return (text.startswith("/") or "\x00" in text or ".." in PurePosixPath(text).parts
            or PureWindowsPath(relative).drive != "")


def path_under(root: str | os.PathLike, relative: str, where: str) -> Path:
    """``root / relative``, refused with one line unless it stays inside ``root``, by name and after symlinks.

    The one check every name taken from an archive, a list or a JSON goes through before it becomes a path to
    write (or read): nothing is looked up outside ``root``, so the answer says nothing about files elsewhere.
    """
    if not relative or leaves(relative):
        raise RegproxyError(f"{where}: the name {relative!r} leads outside {root}; refused")
    path = Path(root) / relative.replace("\\", "/")
    if not inside(root, path):  # a symlink inside that points out
        raise RegproxyError(f"{where}: the name {relative!r} leads outside {root} (through a symbolic link); refused")
    return path


def inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` is ``root`` or under it once symbolic links are followed (the target need not exist)."""
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root
