"""What ``regproxy predict`` reads and writes, and under which names: the inputs a list of files, folders and globs
expands to, the output folder's checks, each input's output name and the files it gets.

No torch here: Ray's driver (:mod:`regproxy_cli.engine.scale`) plans a run with these while its actors import torch
and load the model. Writing the files is :class:`~regproxy_cli.engine.runner.OutputWriter`'s.
"""

from __future__ import annotations

import glob
import itertools
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from regproxy_cli.constants import IMAGE_SUFFIXES
from regproxy_cli.data.formats import COCO_FILE
from regproxy_cli.errors import RegproxyError, one_line


def check_opacity(opacity: float) -> float:
    """The overlay's colour weight: 0 (photo only) to 1 (colours only), or one error line."""
    if not 0 <= opacity <= 1:
        raise RegproxyError(f"--opacity must be between 0 and 1, got {opacity}")
    return opacity


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files, directories (their images, sorted) and glob patterns -> (image paths, problems)."""
    paths, problems = [], []
    for item in inputs:
        if glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            found = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            paths += found
            if not found:
                problems.append(f"{item}: no images match")
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            paths += found
            if not found:
                problems.append(f"{item}: no images in this directory")
        else:
            paths.append(Path(item))  # a missing or bad file is reported when it is read
    unique = {os.path.realpath(p): p for p in reversed(paths)}  # one file named twice is segmented once
    return [p for p in paths if unique.get(os.path.realpath(p)) is p], problems


def check_out_dir(out_dir: Path) -> None:
    """One error line when ``out_dir`` is a file, or would be created under a file or a folder that cannot be
    written; nothing is created (a model that then fails to load leaves no empty folder)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RegproxyError(f"--out {out_dir}: exists and is not a folder")
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise RegproxyError(f"--out {out_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RegproxyError(f"--out {out_dir}: {existing} is not writable")


def prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir``; one error line when it is a file or cannot be created or written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RegproxyError(f"--out {out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RegproxyError(f"--out {out_dir}: cannot create the folder ({one_line(error)})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise RegproxyError(f"--out {out_dir}: this folder is not writable")


# The files one image may get, by name: every one is checked against every other image's before anything runs.
OUTPUT_FILES = ("{}.png", "{}_overlay.png", "{}_regions.png", "{}_maxprob.png", "{}_entropy.png",
                "{}_disagreement.png", "{}_probs.npz", "{}.json")


def output_names(paths: list[Path], levels: tuple[str, ...] = (), files: tuple[str, ...] = OUTPUT_FILES
                 ) -> dict[Path, str]:
    """Each input's output name, distinct by construction: the stem; for a stem several inputs share,
    ``<folder>_<stem>``; when that (or one of its files, e.g. ``x_overlay.png`` of an input ``x_overlay``) is taken,
    ``<folder>_<stem>_<suffix>``, then ``-2``, ``-3``, ... Names and file names are compared ignoring case (a
    case-insensitive file system would merge them). ``files`` are the templates of what one input writes (a
    video: :data:`~regproxy_cli.engine.video.VIDEO_OUTPUT_FILES`)."""
    templates = files + tuple(f"{{}}_{level}.png" for level in levels)
    stems = Counter(p.stem.casefold() for p in paths)
    taken = {COCO_FILE.casefold(), "cvat.zip"}  # the run's own files: an input named 'predictions' must not get them
    names: dict[Path, str] = {}

    def files(name: str) -> set[str]:
        return {template.format(name).casefold() for template in templates}

    def candidates(path: Path) -> Iterator[str]:
        prefix = f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem
        if stems[path.stem.casefold()] == 1:
            yield path.stem
        yield prefix
        if path.suffix:
            yield f"{prefix}_{path.suffix.lstrip('.')}"
        yield from (f"{prefix}-{number}" for number in itertools.count(2))

    # inputs with a stem of their own first: they keep it whenever possible
    for path in sorted(paths, key=lambda p: stems[p.stem.casefold()] > 1):
        name = next(c for c in candidates(path) if not files(c) & taken)
        taken |= files(name)
        names[path] = name
    return names


def expected_files(name: str, *, levels: Iterable[str] = (), formats: Iterable[str] = ("png",),
                   regions: bool = False, confidence: bool = False, tta: bool = False,
                   save_probs: bool = False) -> list[str]:
    """The file names an image named ``name`` gets (not COCO's or CVAT's, which hold the whole run): with format
    png its label PNG, overlay and one PNG per label level (``levels``: e.g. ``category``); the regions picture, the
    confidence pictures (with ``tta``, the views' disagreement too), the ``.npz`` and the labelme JSON when asked."""
    formats = set(formats)
    files = [f"{name}.png", f"{name}_overlay.png"] + [f"{name}_{level}.png" for level in levels]
    files = files if "png" in formats else []
    files += [f"{name}_regions.png"] if regions else []
    if confidence:
        files += [f"{name}_maxprob.png", f"{name}_entropy.png"] + ([f"{name}_disagreement.png"] if tta else [])
    files += [f"{name}_probs.npz"] if save_probs else []
    files += [f"{name}.json"] if "labelme" in formats else []
    return files
