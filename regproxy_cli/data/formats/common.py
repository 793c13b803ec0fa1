"""What the annotation formats share: checked numbers, sizes and points, the picture lookup that keeps names from a
file under the source's folder, optional extras, and the ``Entry``/``Source`` records the readers hand the importer."""

from __future__ import annotations

import base64
import binascii
import glob
import math
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from regproxy_cli.constants import IGNORE_INDEX, IMAGE_SUFFIXES
from regproxy_cli.errors import RegproxyError, one_line, require_extra
from regproxy_cli.files import inside, leaves

# What a damaged or hostile zip raises on reading: bad headers, a corrupt deflate stream, an encrypted or
# unsupported member (RuntimeError, NotImplementedError), text that is not UTF-8.
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError, ValueError)
# Shapes that enclose no area: counted and left out.
LINE_SHAPES = {"line", "linestrip", "point", "points", "polyline", "skeleton", "cuboid", "cuboid_3d", "tag"}

Palette = list[tuple[int, int, int]]
# A picture to copy: a file, or (suffix, bytes) from a zip or a labelme imageData.
Picture = Path | tuple[str, bytes]


class LabelMaps(NamedTuple):
    """Label maps read from an annotation file: ``labels[key]`` holds ids into ``classes``."""

    classes: list[str]
    labels: dict[str, np.ndarray]


@dataclass
class Entry:
    """One image of a source: its output name, where errors point, and how to get its picture and label map."""

    name: str
    where: str
    picture: Callable[[], Picture]
    labels: Callable[[], np.ndarray]  # (H, W) int64 class ids, 255 ignored
    split: str | None = None  # the source's own split, when it has one


@dataclass
class Source:
    """What a reader found: the classes (in id order), their colours when the source has them, the images."""

    classes: list[str]
    palette: Palette | None
    entries: list[Entry]
    skipped: Counter = field(default_factory=Counter)  # shape type -> shapes left out (no area)


def require(module: str, purpose: str) -> ModuleType:
    """pycocotools or OpenCV (the 'annotations' extra), or one error line naming it."""
    return require_extra(module, "annotations", purpose)


def check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got shape {labels.shape} and dtype {labels.dtype}")
    return labels


def class_ids(names: list[str], wanted: list[str] | None, background: str | None) -> list[str]:
    """The classes: ``wanted`` as given, or the source's names with ``background`` first."""
    if wanted is not None:
        return list(wanted)
    if background is None:
        return list(names)
    return [background] + [n for n in names if n != background]


def fill_value(classes: list[str], background: str | None) -> int:
    return classes.index(background) if background is not None else IGNORE_INDEX


def unknown_label(where: str, label: str, wanted: list[str] | None) -> RegproxyError:
    among = "--classes" if wanted is not None else "the classes"
    return RegproxyError(f"{where}: label {label!r} is not one of {among}")


def check_size(width: Any, height: Any, where: str) -> tuple[int, int]:
    """An annotated image size, checked before a canvas is allocated: positive integers, and no more pixels than
    PIL opens (``Image.MAX_IMAGE_PIXELS``, its decompression-bomb limit): a file cannot ask for gigabytes."""
    for key, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RegproxyError(f"{where}: {key} must be a positive integer, got {value!r}")
    limit = Image.MAX_IMAGE_PIXELS or 2**31
    if width * height > limit:
        raise RegproxyError(f"{where}: {width}x{height} is more than {limit} pixels")
    return width, height


def coordinate(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RegproxyError(f"{where}: coordinate {value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise RegproxyError(f"{where}: coordinate {value!r} is not a number") from None
    if not math.isfinite(number):
        raise RegproxyError(f"{where}: coordinate {value!r} is not a finite number")
    return number


def point_pairs(raw: Any, where: str) -> list[tuple[float, float]]:
    """[[x, y], ...] -> float pairs, checked."""
    if not isinstance(raw, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in raw):
        raise RegproxyError(f"{where}: points must be a list of [x, y] pairs")
    return [(coordinate(x, where), coordinate(y, where)) for x, y in raw]


def paint(width: int, height: int, fill: int, shapes: Iterable[tuple[int, str, Any]]) -> np.ndarray:
    """(H, W) int64 label map: ``fill``, then each (value, kind, geometry) over the earlier ones, filled with its
    outline as labelme's ``shapes_to_label`` does (PIL). Kinds: ``polygon`` [(x, y), ...], ``box`` and ``ellipse``
    [x0, y0, x1, y1] (any two opposite corners), ``mask`` (left, top, a bool array)."""
    picture = Image.new("I", (width, height), fill)
    draw = ImageDraw.Draw(picture)
    for value, kind, geometry in shapes:
        if kind == "polygon":
            draw.polygon(geometry, fill=value, outline=value)
        elif kind == "mask":
            left, top, mask = geometry
            paste_mask(picture, mask, left, top, value)
        else:
            x0, y0, x1, y1 = geometry
            box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
            (draw.rectangle if kind == "box" else draw.ellipse)(box, fill=value, outline=value)
    return np.asarray(picture, dtype=np.int64)


def paste_mask(picture: Image.Image, mask: np.ndarray, left: int, top: int, value: int) -> None:
    """Paint ``value`` where ``mask`` (placed with its top-left pixel at left, top) is set; off-image parts dropped."""
    height, width = mask.shape
    if not mask.size or left >= picture.width or top >= picture.height or left + width <= 0 or top + height <= 0:
        return  # nothing of it on the image (and coordinates far outside would overflow PIL's C ints)
    if mask.size:
        stencil = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
        picture.paste(value, (left, top, left + mask.shape[1], top + mask.shape[0]), stencil)


def decode_base64(text: Any, where: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, TypeError, ValueError) as error:
        raise RegproxyError(f"{where}: {what} is not base64 ({one_line(error)})") from None


def plain_name(name: str, where: str) -> str:
    """``name`` when it can be an output file name as it is (no folder part, no ``..``), else one error line: names
    from an archive, a list or a JSON never choose where in (or outside) the destination a file goes."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or leaves(name):
        raise RegproxyError(f"{where}: {name!r} is not a plain file name (it would be written outside its folder "
                            "in the dataset); refused")
    return name


def find_picture(name: str, folders: Sequence[Path], allow_outside: bool = False) -> Path | None:
    """``name`` (a relative path, '/' or '\\' separated) in the first folder that has it, whole or by file name.

    A name that leaves the folder (absolute, ``..``, a symlink pointing out) is looked up by its file name under
    the folder only, unless ``allow_outside``: whether a file exists elsewhere never changes the answer."""
    relative = Path(name.replace("\\", "/"))
    for folder in folders:
        candidates = [folder / relative.name]
        if allow_outside or not leaves(name):
            candidates.insert(0, folder / relative)
        for candidate in candidates:
            if not allow_outside and not inside(folder, candidate):
                continue
            if candidate.is_file():
                return candidate
    return None


def missing_picture(where: str, name: str, folders: Sequence[Path]) -> RegproxyError:
    if leaves(name):  # the same line whether or not something exists where the name points
        return RegproxyError(f"{where}: its image {name!r} is outside {' or '.join(str(f) for f in folders)} and "
                             "no file of its name is inside; pictures are read from under the source or --images only: "
                             "point --images at its folder, or pass --allow-outside-paths")
    return RegproxyError(f"{where}: its image {name!r} is not in {' or '.join(str(f) for f in folders)}; "
                         "point --images at the folder that holds it")


def located(name: str, folders: Sequence[Path], where: str, allow_outside: bool = False) -> Callable[[], Picture]:
    # looked up now: a missing picture stops the import before it writes
    found = find_picture(name, folders, allow_outside)
    if found is None:
        raise missing_picture(where, name, folders)
    return lambda: found


def by_stem(stem: str, folder: Path, where: str) -> Callable[[], Picture]:
    plain_name(stem, where)
    found = sorted(p for p in folder.glob(f"{glob.escape(stem)}.*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and inside(folder, p)) if folder.is_dir() else []
    if not found:
        raise RegproxyError(f"{where}: no image named {stem}.* in {folder}; point --images at the folder that holds "
                            "it")
    return lambda: found[0]
