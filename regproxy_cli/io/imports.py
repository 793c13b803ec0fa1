"""Annotation-tool exports -> the folder dataset format (``regproxy data import``).

Sources, one per ``--from``:

* **labelme**: a folder of labelme ``<stem>.json`` files (or one file). Shapes are painted in file order, later
  over earlier, as labelme's ``shapes_to_label`` does: polygons and rectangles filled with their outline (PIL),
  circles (centre + a point on the circle) and ``mask`` shapes (a base64 PNG over the two points' box); a hole is
  drawn by a later shape inside an earlier one. The label ``__ignore__`` paints 255, as labelme's
  ``labelme2voc`` reads it. The picture is ``imagePath`` (next to the JSON) or, failing that, ``imageData``.
* **coco**: a COCO instances JSON. Polygons are rasterised by pycocotools (one polygon's crossings by the
  even-odd rule, so a polygon that walks round a hole and back keeps it; several polygons of an annotation are
  united), RLEs (``iscrowd`` ones, compressed or not) decoded by pycocotools; annotations painted in file order.
* **cvat**: "CVAT for images 1.1" (``annotations.xml``, a folder or zip holding it): polygons, boxes, ellipses
  and ``mask`` elements (CVAT's run lengths over the mask's box, first run background) painted by ``z_order``,
  then file order; or a "Segmentation mask 1.1" zip (``labelmap.txt`` + ``SegmentationClass/``), what
  ``regproxy predict --format cvat`` writes, read by :func:`regproxy_cli.io.annotations.read_cvat_zip`.
* **voc**: Pascal VOC (``JPEGImages``, ``SegmentationClass`` palette PNGs, ``ImageSets/Segmentation``): class
  ids as they are, 255 (the object borders) ignored, its train/val lists kept as the splits.

Line-like shapes (labelme lines and points, CVAT polylines, points, skeletons, cuboids, tags) cover no area and
are counted, not painted. Pixels no shape covers get 255 (ignored), or the ``background`` class when one is named.
A label that is not a class, a polygon with fewer than 3 points or non-numeric coordinates, a missing picture or a
picture whose size differs from its annotation stops the import with one line naming the file.

The result is ``classes.yaml`` (names and palette), ``images/{train,val}/<stem><suffix>`` (the pictures copied
unchanged) and ``masks/{train,val}/<stem>.png`` (palette PNGs of class ids). It is written into a hidden folder
beside the destination and renamed onto it at the end, so an import that stops leaves nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import glob
import io
import json
import math
import os
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import yaml
from PIL import Image, ImageDraw
from tqdm import tqdm

from regproxy_cli.classes import default_palette
from regproxy_cli.constants import IGNORE_INDEX, IMAGE_SUFFIXES
from regproxy_cli.data.datasets import load_mask, read_classes_file
from regproxy_cli.errors import RegproxyError, listed, one_line
from regproxy_cli.files import inside, leaves, path_under
from regproxy_cli.images import READ_ERRORS, save_label_png
from regproxy_cli.io.annotations import (
    CVAT_BACKGROUND,
    ZIP_ERRORS,
    _parse_labelmap,
    _require,
    read_cvat_zip,
    voc_colormap,
)

IMPORT_FORMATS = ("labelme", "coco", "cvat", "voc")
SPLITS = ("train", "val")
LABELME_IGNORE = "__ignore__"  # labelme2voc's name for "do not train on these pixels"
# Shapes that enclose no area: counted and left out.
LINE_SHAPES = {"line", "linestrip", "point", "points", "polyline", "skeleton", "cuboid", "cuboid_3d", "tag"}
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

Palette = list[tuple[int, int, int]]
# A picture to copy: a file, or (suffix, bytes) from a zip or a labelme imageData.
Picture = Path | tuple[str, bytes]


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


@dataclass
class ImportResult:
    """What ``import_annotations`` wrote."""

    destination: Path
    classes: list[str]
    palette: Palette
    images: dict[str, int]  # split -> images
    skipped: dict[str, int]  # shape type -> shapes left out
    unlabelled: list[str]  # images without a single labelled pixel

    def to_dict(self) -> dict[str, Any]:
        return {"destination": str(self.destination), "classes": self.classes,
                "palette": [list(c) for c in self.palette], "images": self.images, "skipped_shapes": self.skipped,
                "unlabelled_images": self.unlabelled}


# ---------------------------------------------------------------------------------------------------- the import


def import_annotations(
    source_format: str,
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    classes: str | Sequence[str] | None = None,
    background: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
    allow_outside_paths: bool = False,
) -> ImportResult:
    """Convert an annotation-tool export into a folder dataset at ``destination``.

    Args:
        source_format: ``labelme``, ``coco``, ``cvat`` or ``voc``.
        source: the export (see the module docstring for what each format expects).
        destination: the dataset folder to create; it must not exist or be empty, unless ``force``.
        images: where the pictures are, for sources that only name them (COCO ``file_name``, CVAT image names,
            labelme ``imagePath`` by file name); default: beside the annotation file.
        classes: the class names in id order: a list, a comma-separated string, a ``classes.yaml`` (its palette
            too) or a text file with one name per line. A source label that is not one of them is an error.
            Default: the source's own (COCO categories by id, CVAT labels, VOC's 21, labelme labels sorted).
        background: the class of pixels no shape covers (added first to inferred classes); default 255, ignored.
        val_fraction: the share of images drawn into ``val`` (seeded) when the source has no split of its own.
        seed: the seed of that draw.
        force: replace a non-empty ``destination``.
        progress: show a progress bar.
        allow_outside_paths: let a picture named by an absolute or climbing path (labelme ``imagePath``, COCO
            ``file_name``, CVAT image name) be read where it points; by default pictures are looked up under the
            source's folder (or ``images``) only, by that name's file name. Names of outputs never leave
            ``destination``, whatever this says.

    Raises:
        RegproxyError: one line naming the file, for anything the import cannot use.
    """
    if source_format not in IMPORT_FORMATS:
        raise RegproxyError(f"unknown import format {source_format!r}; choose from {', '.join(IMPORT_FORMATS)}")
    if not 0 <= val_fraction < 1:
        raise RegproxyError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")
    source, destination = Path(source), Path(destination)
    if not source.exists():
        raise RegproxyError(f"{source}: no such file or folder")
    _check_destination(source, destination, force)
    wanted, wanted_palette = parse_classes(classes) if classes is not None else (None, None)
    if background is not None and source_format == "voc":
        raise RegproxyError("--background does not apply to VOC: its masks label every pixel")
    if wanted is not None and background is not None and background not in wanted:
        raise RegproxyError(f"--background {background!r} is not one of --classes")
    picture_dir = Path(images) if images is not None else None
    if picture_dir is not None and not picture_dir.is_dir():
        raise RegproxyError(f"--images {picture_dir}: not a folder")
    reader = {"labelme": read_labelme_source, "coco": read_coco_source, "cvat": read_cvat_source,
              "voc": read_voc_source}[source_format]
    found = reader(source, wanted, picture_dir, background, allow_outside=allow_outside_paths)
    if not 1 <= len(found.classes) <= IGNORE_INDEX:  # checked before a mask is drawn with their palette
        raise RegproxyError(f"{source}: {len(found.classes)} classes; the folder format holds 1 to {IGNORE_INDEX}")
    palette = _choose_palette(found.classes, wanted_palette or found.palette)
    if not found.entries:
        raise RegproxyError(f"{source}: no annotated images found")
    _check_names(found.entries)
    splits = assign_splits([e.name for e in found.entries if e.split is None], val_fraction, seed)
    destination.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.import-"))
    try:
        counts: Counter = Counter()
        unlabelled = []
        for entry in tqdm(found.entries, desc="importing", unit="image", disable=not progress, leave=False):
            split = entry.split or splits[entry.name]
            try:
                labels = entry.labels()
            except (OverflowError, ValueError, TypeError) as error:  # coordinates PIL cannot draw
                raise RegproxyError(f"{entry.where}: cannot draw its shapes ({one_line(error)})") from None
            if (labels == IGNORE_INDEX).all():
                unlabelled.append(entry.name)
            _write_picture(entry, labels.shape, work / "images" / split)
            (work / "masks" / split).mkdir(parents=True, exist_ok=True)
            save_label_png(path_under(work / "masks" / split, f"{entry.name}.png", entry.where), labels, palette)
            counts[split] += 1
        _write_classes(work / "classes.yaml", found.classes, palette, source_format, source)
        _move_into_place(work, destination)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    ordered = {split: counts[split] for split in [*SPLITS, *sorted(set(counts) - set(SPLITS))] if split in counts}
    return ImportResult(destination, found.classes, palette, ordered, dict(found.skipped), sorted(unlabelled))


def parse_classes(value: str | Sequence[str]) -> tuple[list[str], Palette | None]:
    """``--classes``: names (and a palette, from a classes.yaml) from a list, a file or a comma-separated string."""
    palette = None
    if isinstance(value, str):
        path = Path(value)
        if path.suffix.lower() in (".yaml", ".yml", ".txt"):
            if not path.is_file():
                raise RegproxyError(f"--classes {value}: no such file")
            if path.suffix.lower() == ".txt":
                lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
                # labelme's labels.txt starts with __ignore__: a convention, not a class
                names = [line for line in lines if line and not line.startswith("#") and line != LABELME_IGNORE]
            else:
                spec = read_classes_file(path)
                names, palette = spec["classes"], spec["palette"]
        else:
            names = [name.strip() for name in value.split(",") if name.strip()]
    else:
        names = [str(name) for name in value]
    if not names:
        raise RegproxyError("--classes names no class")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise RegproxyError(f"--classes names {listed(duplicates)} more than once")
    return names, palette


def assign_splits(names: Sequence[str], val_fraction: float, seed: int) -> dict[str, str]:
    """A seeded train/val draw: ``round(n * val_fraction)`` of the names (at least one, and never all, when the
    fraction is above 0 and there are two or more) go to ``val``. Depends only on the set of names and the seed."""
    ordered = sorted(names)
    count = round(len(ordered) * val_fraction)
    if val_fraction > 0 and len(ordered) > 1:
        count = min(max(count, 1), len(ordered) - 1)
    drawn = np.random.default_rng(seed).permutation(len(ordered))[:count]
    val = {ordered[i] for i in drawn.tolist()}
    return {name: "val" if name in val else "train" for name in ordered}


def _check_destination(source: Path, destination: Path, force: bool) -> None:
    if destination.exists() and not destination.is_dir():
        raise RegproxyError(f"{destination}: exists and is not a folder")
    resolved_source, resolved_destination = source.resolve(), destination.resolve()
    if resolved_source == resolved_destination or resolved_destination in resolved_source.parents:
        raise RegproxyError(f"{destination}: holds the source {source}; import into another folder")
    if destination.is_dir() and any(destination.iterdir()) and not force:
        raise RegproxyError(f"{destination}: exists and is not empty; --force replaces it")


def _move_into_place(work: Path, destination: Path) -> None:
    """Rename the finished folder onto ``destination``; an old one is moved aside first and removed after."""
    if not destination.exists():
        os.rename(work, destination)
        return
    if not any(destination.iterdir()):
        destination.rmdir()
        os.rename(work, destination)
        return
    trash = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.old-"))
    os.rename(destination, trash / "previous")
    os.rename(work, destination)
    shutil.rmtree(trash, ignore_errors=True)


def plain_name(name: str, where: str) -> str:
    """``name`` when it can be an output file name as it is (no folder part, no ``..``), else one error line: names
    from an archive, a list or a JSON never choose where in (or outside) the destination a file goes."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or leaves(name):
        raise RegproxyError(f"{where}: {name!r} is not a plain file name (it would be written outside its folder "
                            "in the dataset); refused")
    return name


def _check_names(entries: list[Entry]) -> None:
    seen: dict[str, str] = {}
    for entry in entries:
        plain_name(entry.name, entry.where)
        if entry.name in seen:
            raise RegproxyError(f"{entry.where} and {seen[entry.name]} would both be named {entry.name!r} in the "
                                "dataset; rename one")
        seen[entry.name] = entry.where


def _choose_palette(classes: list[str], palette: Palette | None) -> Palette:
    """The source's colours when there is one distinct colour per class, else the default palette."""
    if palette is not None and len(palette) == len(classes) and len(set(palette)) == len(palette):
        return [tuple(int(v) for v in colour) for colour in palette]
    return default_palette(len(classes))


def _write_classes(path: Path, classes: list[str], palette: Palette, source_format: str, source: Path) -> None:
    if not 1 <= len(classes) <= IGNORE_INDEX:
        raise RegproxyError(f"{source}: {len(classes)} classes; the folder format holds 1 to {IGNORE_INDEX}")
    header = f"# written by `regproxy data import --from {source_format}` from {source}\n"
    body = yaml.safe_dump({"classes": list(classes), "palette": [list(c) for c in palette]}, sort_keys=False,
                          default_flow_style=None, allow_unicode=True)
    path.write_text(header + body, encoding="utf-8")


def _write_picture(entry: Entry, shape: tuple[int, ...], folder: Path) -> None:
    """Copy the picture unchanged, after checking it is an image of the label map's size."""
    try:
        picture = entry.picture()
    except ZIP_ERRORS as error:  # a damaged zip member, an unreadable file
        raise RegproxyError(f"{entry.where}: cannot read its picture ({one_line(error)})") from None
    if isinstance(picture, Path):
        suffix, opener, what = picture.suffix.lower(), lambda: Image.open(picture), str(picture)
    else:
        suffix, data = picture
        opener, what = (lambda: Image.open(io.BytesIO(data))), f"the picture of {entry.where}"
    if suffix not in IMAGE_SUFFIXES:
        raise RegproxyError(f"{what}: a {suffix or 'suffix-less'} file; the folder format reads "
                            f"{', '.join(IMAGE_SUFFIXES)}")
    try:
        with opener() as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF says: turn by 90 degrees
                width, height = height, width
    except READ_ERRORS as error:
        raise RegproxyError(f"{what}: cannot read the image ({one_line(error)})") from None
    if (height, width) != tuple(shape):
        raise RegproxyError(f"{what} is {width}x{height} but {entry.where} annotates {shape[1]}x{shape[0]} "
                            "(width x height)")
    folder.mkdir(parents=True, exist_ok=True)
    target = path_under(folder, f"{entry.name}{suffix}", entry.where)
    if isinstance(picture, Path):
        shutil.copyfile(picture, target)
    else:
        target.write_bytes(picture[1])


def _class_ids(names: list[str], wanted: list[str] | None, background: str | None) -> list[str]:
    """The classes: ``wanted`` as given, or the source's names with ``background`` first."""
    if wanted is not None:
        return list(wanted)
    if background is None:
        return list(names)
    return [background] + [n for n in names if n != background]


def _fill(classes: list[str], background: str | None) -> int:
    return classes.index(background) if background is not None else IGNORE_INDEX


def _unknown(where: str, label: str, wanted: list[str] | None) -> RegproxyError:
    among = "--classes" if wanted is not None else "the classes"
    return RegproxyError(f"{where}: label {label!r} is not one of {among}")


def _size(width: Any, height: Any, where: str) -> tuple[int, int]:
    """An annotated image size, checked before a canvas is allocated: positive integers, and no more pixels than
    PIL opens (``Image.MAX_IMAGE_PIXELS``, its decompression-bomb limit): a file cannot ask for gigabytes."""
    for key, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RegproxyError(f"{where}: {key} must be a positive integer, got {value!r}")
    limit = Image.MAX_IMAGE_PIXELS or 2**31
    if width * height > limit:
        raise RegproxyError(f"{where}: {width}x{height} is more than {limit} pixels")
    return width, height


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RegproxyError(f"{where}: coordinate {value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise RegproxyError(f"{where}: coordinate {value!r} is not a number") from None
    if not math.isfinite(number):
        raise RegproxyError(f"{where}: coordinate {value!r} is not a finite number")
    return number


def _points(raw: Any, where: str) -> list[tuple[float, float]]:
    """[[x, y], ...] -> float pairs, checked."""
    if not isinstance(raw, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in raw):
        raise RegproxyError(f"{where}: points must be a list of [x, y] pairs")
    return [(_number(x, where), _number(y, where)) for x, y in raw]


def _find_picture(name: str, folders: Sequence[Path], allow_outside: bool = False) -> Path | None:
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


def _missing_picture(where: str, name: str, folders: Sequence[Path]) -> RegproxyError:
    if leaves(name):  # the same line whether or not something exists where the name points
        return RegproxyError(f"{where}: its image {name!r} is outside {' or '.join(str(f) for f in folders)} and "
                             "no file of its name is inside; pictures are read from under the source or --images only: "
                             "point --images at its folder, or pass --allow-outside-paths")
    return RegproxyError(f"{where}: its image {name!r} is not in {' or '.join(str(f) for f in folders)}; "
                         "point --images at the folder that holds it")


# ---------------------------------------------------------------------------------------------------- labelme


def read_labelme_source(source: Path, wanted: list[str] | None, images: Path | None,
                        background: str | None, *, allow_outside: bool = False) -> Source:
    """A folder of labelme JSON files (or one file) -> the images to import."""
    files = [source] if source.is_file() else sorted(source.glob("*.json"))
    if not files:
        raise RegproxyError(f"{source}: no labelme *.json files")
    documents = {path: _labelme_document(path) for path in files}  # checked up front, before anything is drawn
    names = sorted({shape["label"] for document in documents.values() for shape in document["shapes"]
                    if shape["shape_type"] not in LINE_SHAPES and shape["label"] != LABELME_IGNORE})
    classes = _class_ids(names, wanted, background)
    skipped: Counter = Counter()
    for path, document in documents.items():
        for shape in document["shapes"]:
            if shape["shape_type"] in LINE_SHAPES:
                skipped[shape["shape_type"]] += 1
            elif shape["label"] != LABELME_IGNORE and shape["label"] not in classes:
                raise _unknown(str(path), shape["label"], wanted)
    fill = _fill(classes, background)
    entries = [Entry(path.stem, str(path), _labelme_picture(path, document, images, allow_outside),
                     _labelme_labels(document, classes, fill, str(path)))
               for path, document in documents.items()]
    return Source(classes, None, entries, skipped)


def _labelme_document(path: Path) -> dict:
    """Read and check one labelme file; shapes get a ``shape_type`` and checked float ``points``."""
    document = _read_json(path)
    if not isinstance(document, dict) or not isinstance(document.get("shapes"), list):
        raise RegproxyError(f"{path}: not a labelme file (no 'shapes' list)")
    for key in ("imageHeight", "imageWidth"):
        value = document.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RegproxyError(f"{path}: {key} must be a positive integer, got {value!r}")
    _size(document["imageWidth"], document["imageHeight"], str(path))
    for number, shape in enumerate(document["shapes"], start=1):
        where = f"{path}: shape {number}"
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            raise RegproxyError(f"{where}: no label")
        kind = shape.get("shape_type") or "polygon"
        if not isinstance(kind, str):
            raise RegproxyError(f"{where}: shape_type must be a string, got {kind!r}")
        shape["shape_type"] = kind
        where = f"{where} ({shape['label']!r}, {kind})"
        points = _points(shape.get("points"), where)
        shape["points"] = points
        if kind in LINE_SHAPES:
            continue
        needed = {"polygon": 3, "rectangle": 2, "circle": 2, "mask": 2}.get(kind)
        if needed is None:
            raise RegproxyError(f"{where}: unknown shape type; labelme draws polygon, rectangle, circle, mask, "
                                "line, linestrip, point")
        if kind == "polygon" and len(points) < 3:
            raise RegproxyError(f"{where}: a polygon needs at least 3 points, it has {len(points)}")
        if kind != "polygon" and len(points) != 2:
            raise RegproxyError(f"{where}: needs 2 points, it has {len(points)}")
        if kind == "mask" and not isinstance(shape.get("mask"), str):
            raise RegproxyError(f"{where}: no base64 'mask' PNG")
    return document


def _labelme_picture(path: Path, document: dict, images: Path | None,
                     allow_outside: bool = False) -> Callable[[], Picture]:
    def picture() -> Picture:
        name = document.get("imagePath") or ""
        if not isinstance(name, str):
            raise RegproxyError(f"{path}: imagePath must be a string, got {name!r}")
        folders = [images] if images is not None else [path.parent]
        found = _find_picture(name, folders, allow_outside) if name else None
        if found is not None:
            return found
        if document.get("imageData"):
            data = _base64(document["imageData"], str(path), "imageData")
            suffix = Path(name.replace("\\", "/")).suffix.lower()
            if suffix not in IMAGE_SUFFIXES:
                suffix = _image_suffix(data, str(path))
            return suffix, data
        raise _missing_picture(str(path), name, folders)

    return picture


def _labelme_labels(document: dict, classes: list[str], fill: int, where: str) -> Callable[[], np.ndarray]:
    def labels() -> np.ndarray:
        width, height = document["imageWidth"], document["imageHeight"]
        picture = Image.new("I", (width, height), fill)
        draw = ImageDraw.Draw(picture)
        for shape in document["shapes"]:
            kind, points = shape["shape_type"], shape["points"]
            if kind in LINE_SHAPES:
                continue
            value = IGNORE_INDEX if shape["label"] == LABELME_IGNORE else classes.index(shape["label"])
            if kind == "polygon":
                draw.polygon(points, fill=value, outline=value)
            elif kind == "rectangle":
                (x0, y0), (x1, y1) = points
                draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=value, outline=value)
            elif kind == "circle":
                (cx, cy), (px, py) = points
                radius = math.hypot(cx - px, cy - py)
                draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=value, outline=value)
            else:  # mask: a binary PNG whose top-left pixel sits at the first point
                mask = _png_mask(shape["mask"], where)
                (x0, y0), _ = points
                _paste(picture, mask, int(x0), int(y0), value)
        return np.asarray(picture, dtype=np.int64)

    return labels


def _png_mask(text: str, where: str) -> np.ndarray:
    data = _base64(text, where, "mask")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("L")) > 0
    except READ_ERRORS as error:
        raise RegproxyError(f"{where}: a mask shape is not a PNG ({one_line(error)})") from None


def _paste(picture: Image.Image, mask: np.ndarray, left: int, top: int, value: int) -> None:
    """Paint ``value`` where ``mask`` (placed with its top-left pixel at left, top) is set; off-image parts dropped."""
    height, width = mask.shape
    if not mask.size or left >= picture.width or top >= picture.height or left + width <= 0 or top + height <= 0:
        return  # nothing of it on the image (and coordinates far outside would overflow PIL's C ints)
    if mask.size:
        stencil = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
        picture.paste(value, (left, top, left + mask.shape[1], top + mask.shape[0]), stencil)


def _base64(text: Any, where: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, TypeError, ValueError) as error:
        raise RegproxyError(f"{where}: {what} is not base64 ({one_line(error)})") from None


def _image_suffix(data: bytes, where: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = (image.format or "").lower()
    except READ_ERRORS as error:
        raise RegproxyError(f"{where}: imageData is not an image ({one_line(error)})") from None
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(kind, f".{kind}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RegproxyError(f"{path}: cannot read the JSON ({one_line(error)})") from None


# ---------------------------------------------------------------------------------------------------- COCO


def read_coco_source(source: Path, wanted: list[str] | None, images: Path | None,
                     background: str | None, *, allow_outside: bool = False) -> Source:
    """A COCO instances JSON -> the images to import (pictures under ``images``, default the JSON's folder)."""
    if not source.is_file():
        raise RegproxyError(f"{source}: --from coco reads a COCO JSON file, not a folder")
    mask_utils = _require("pycocotools.mask", "--from coco")
    document = _read_json(source)
    if not isinstance(document, dict) or not all(isinstance(document.get(k), list)
                                                 for k in ("images", "annotations", "categories")):
        raise RegproxyError(f"{source}: not a COCO file (needs 'images', 'annotations' and 'categories' lists)")
    category_names = {}
    for category in document["categories"]:
        if not isinstance(category, dict) or not isinstance(category.get("name"), str) or \
                isinstance(category.get("id"), bool) or not isinstance(category.get("id"), int):
            raise RegproxyError(f"{source}: a category without an integer id and a name: {category!r}")
        category_names[category["id"]] = category["name"]
    names = [category_names[i] for i in sorted(category_names)]
    classes = _class_ids(names, wanted, background)
    pictures, entries_by_id = [images] if images is not None else [source.parent], {}
    for image in document["images"]:
        where = f"{source}: image {image.get('file_name', image.get('id'))!r}" if isinstance(image, dict) else ""
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or \
                not isinstance(image.get("id"), (int, str)):
            raise RegproxyError(f"{source}: an image without an id and a file_name: {image!r}")
        for key in ("height", "width"):
            if isinstance(image.get(key), bool) or not isinstance(image.get(key), int) or image[key] < 1:
                raise RegproxyError(f"{where}: {key} must be a positive integer")
        _size(image["width"], image["height"], where)
        entries_by_id[image["id"]] = (image, where, [])
    for annotation in document["annotations"]:
        if not isinstance(annotation, dict) or not isinstance(annotation.get("image_id"), (int, str)) or \
                annotation["image_id"] not in entries_by_id:
            raise RegproxyError(f"{source}: annotation {_annotation_id(annotation)} names no image of the file")
        image, where, found = entries_by_id[annotation["image_id"]]
        what = f"{where}, annotation {_annotation_id(annotation)}"
        category = annotation.get("category_id")
        if isinstance(category, bool) or not isinstance(category, int) or category not in category_names:
            raise RegproxyError(f"{what}: category_id {category!r} is not among the categories")
        if category_names[category] not in classes:
            raise _unknown(what, category_names[category], wanted)
        segmentation = _coco_segmentation(annotation.get("segmentation"), image["height"], image["width"], what)
        if segmentation is not None:
            found.append((classes.index(category_names[category]), segmentation, what))
    fill = _fill(classes, background)
    entries = []
    for image, where, found in entries_by_id.values():
        name = image["file_name"]
        entries.append(Entry(Path(name.replace("\\", "/")).stem, where, _located(name, pictures, where, allow_outside),
                             _coco_labels(mask_utils, image, found, fill)))
    return Source(classes, None, entries)


def _annotation_id(annotation: Any) -> str:
    return repr(annotation.get("id")) if isinstance(annotation, dict) else "(not an object)"


def _coco_segmentation(segmentation: Any, height: int, width: int, where: str) -> Any:
    """Check a COCO segmentation; None when there is none (a box-only annotation)."""
    if segmentation is None or segmentation == []:
        return None
    if isinstance(segmentation, list):  # polygons: [x0, y0, x1, y1, ...] each
        polygons = []
        for polygon in segmentation:
            if not isinstance(polygon, list):
                raise RegproxyError(f"{where}: a polygon must be a list of numbers")
            numbers = [_number(v, where) for v in polygon]
            if len(numbers) % 2:
                raise RegproxyError(f"{where}: a polygon has an odd count of coordinates ({len(numbers)})")
            if len(numbers) < 6:
                raise RegproxyError(f"{where}: a polygon needs at least 3 points, it has {len(numbers) // 2}")
            polygons.append(numbers)
        return polygons
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        raise RegproxyError(f"{where}: segmentation must be polygons or an RLE with size and counts")
    if segmentation.get("size") != [height, width]:
        raise RegproxyError(f"{where}: RLE size {segmentation.get('size')!r} is not the image's [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) or (
                sum(counts) != height * width):
            raise RegproxyError(f"{where}: RLE counts must be non-negative integers adding up to {height * width}")
    elif not isinstance(counts, str):
        raise RegproxyError(f"{where}: RLE counts must be a string or a list of integers")
    return segmentation


def _coco_labels(mask_utils: Any, image: dict, found: list, fill: int) -> Callable[[], np.ndarray]:
    def labels() -> np.ndarray:
        height, width = image["height"], image["width"]
        canvas = np.full((height, width), fill, dtype=np.int64)
        for value, segmentation, where in found:  # file order: later annotations over earlier
            if isinstance(segmentation, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation["counts"], list):
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii", "replace")}
            try:
                mask = mask_utils.decode(rle)
                area = int(mask_utils.area(rle))
            except (ValueError, TypeError) as error:
                raise RegproxyError(f"{where}: cannot decode the RLE ({one_line(error)})") from None
            # a truncated RLE leaves the rest of pycocotools' buffer undefined: its runs then do not add up
            if mask.max(initial=0) > 1 or int(mask.sum(dtype=np.int64)) != area:
                raise RegproxyError(f"{where}: the RLE is damaged (its runs do not cover the image)")
            canvas[mask.astype(bool)] = value
        return canvas

    return labels


def _located(name: str, folders: Sequence[Path], where: str, allow_outside: bool = False) -> Callable[[], Picture]:
    # looked up now: a missing picture stops the import before it writes
    found = _find_picture(name, folders, allow_outside)
    if found is None:
        raise _missing_picture(where, name, folders)
    return lambda: found


# ---------------------------------------------------------------------------------------------------- CVAT


def read_cvat_source(source: Path, wanted: list[str] | None, images: Path | None,
                     background: str | None, *, allow_outside: bool = False) -> Source:
    """CVAT for images 1.1 (annotations.xml, a folder or zip holding it) or a Segmentation mask 1.1 zip."""
    if source.is_dir():
        xml = source / "annotations.xml"
        if not xml.is_file():
            raise RegproxyError(f"{source}: no annotations.xml (CVAT for images 1.1)")
        return _read_cvat_xml(xml.read_bytes(), str(xml), wanted, images or source, None, background, allow_outside)
    if source.suffix.lower() == ".xml":
        return _read_cvat_xml(source.read_bytes(), str(source), wanted, images or source.parent, None, background,
                              allow_outside)
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.namelist()
            if "annotations.xml" in members:  # its pictures: in the zip, unless --images says where
                return _read_cvat_xml(archive.read("annotations.xml"), f"{source}:annotations.xml", wanted,
                                      images or source.parent, source if images is None else None, background,
                                      allow_outside)
    except ZIP_ERRORS as error:
        raise RegproxyError(f"{source}: not a CVAT export (an annotations.xml, or a zip: {one_line(error)})") from None
    if "labelmap.txt" in members:
        return _read_cvat_masks(source, members, wanted, images or source.parent, background)
    raise RegproxyError(f"{source}: neither annotations.xml (CVAT for images 1.1) nor labelmap.txt "
                        "(Segmentation mask 1.1) in the zip")


def _read_cvat_xml(data: bytes, where: str, wanted: list[str] | None, folder: Path, archive: Path | None,
                   background: str | None, allow_outside: bool = False) -> Source:
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise RegproxyError(f"{where}: not valid XML ({one_line(error)})") from None
    if root.tag != "annotations":
        raise RegproxyError(f"{where}: not a CVAT for images file (the root is <{root.tag}>, not <annotations>)")
    declared, colours = [], []
    for label in root.findall("./meta/*/labels/label"):
        name = (label.findtext("name") or "").strip()
        if name and name not in declared:
            declared.append(name)
            colours.append(_hex_colour(label.findtext("color") or ""))
    image_elements = root.findall("image")
    used = sorted({shape.get("label", "") for image in image_elements for shape in image
                   if shape.tag not in LINE_SHAPES} - set(declared))
    classes = _class_ids(declared + used, wanted, background)
    palette = colours if not used and wanted is None and background is None and None not in colours else None
    skipped: Counter = Counter()
    zipped = _zip_pictures(archive) if archive is not None else {}
    folders = [folder, folder / "images"]
    fill = _fill(classes, background)
    entries = []
    for image in image_elements:
        name = image.get("name") or ""
        what = f"{where}: image {name!r}"
        try:
            width, height = int(image.get("width", "")), int(image.get("height", ""))
        except ValueError:
            raise RegproxyError(f"{what}: width and height must be integers") from None
        _size(width, height, what)
        shapes = []
        for order, shape in enumerate(image):
            if shape.tag in LINE_SHAPES:
                skipped[shape.tag] += 1
                continue
            shape_where = f"{what}, <{shape.tag}> {order + 1}"
            label = shape.get("label", "")
            if label not in classes:
                raise _unknown(shape_where, label, wanted)
            try:
                z_order = int(shape.get("z_order", "0"))
            except ValueError:
                raise RegproxyError(f"{shape_where}: z_order must be an integer") from None
            shapes.append((z_order, order, classes.index(label), _cvat_shape(shape, shape_where)))
        shapes.sort(key=lambda s: s[:2])  # CVAT paints higher z_order on top; file order breaks ties
        picture = _zip_or_folder(name, zipped, archive, folders, what, allow_outside)
        entries.append(Entry(Path(name.replace("\\", "/")).stem, what, picture,
                             _cvat_labels(width, height, [(v, s) for _, _, v, s in shapes], fill)))
    return Source(classes, palette, entries, skipped)


def _hex_colour(text: str) -> tuple[int, int, int] | None:
    text = text.strip().lstrip("#")
    if len(text) != 6:
        return None
    try:
        value = int(text, 16)
    except ValueError:
        return None
    return (value >> 16) & 255, (value >> 8) & 255, value & 255


def _cvat_shape(shape: ElementTree.Element, where: str) -> tuple[str, Any]:
    """A CVAT area shape, checked, as (kind, geometry) for :func:`_cvat_labels`."""
    def number(key: str) -> float:
        return _number(shape.get(key, ""), f"{where}: {key}")

    if shape.tag == "polygon":
        points = []
        for pair in (shape.get("points") or "").split(";"):
            parts = pair.split(",")
            if len(parts) != 2:
                raise RegproxyError(f"{where}: points must be 'x,y;x,y;...', got {pair!r}")
            points.append((_number(parts[0], where), _number(parts[1], where)))
        if len(points) < 3:
            raise RegproxyError(f"{where}: a polygon needs at least 3 points, it has {len(points)}")
        return "polygon", points
    if shape.tag == "box":
        return "box", [number("xtl"), number("ytl"), number("xbr"), number("ybr")]
    if shape.tag == "ellipse":
        cx, cy, rx, ry = number("cx"), number("cy"), number("rx"), number("ry")
        angle = math.radians(_number(shape.get("rotation", "0"), f"{where}: rotation"))
        steps = np.linspace(0, 2 * math.pi, 128, endpoint=False)
        xs = cx + rx * np.cos(steps) * math.cos(angle) - ry * np.sin(steps) * math.sin(angle)
        ys = cy + rx * np.cos(steps) * math.sin(angle) + ry * np.sin(steps) * math.cos(angle)
        return "polygon", list(zip(xs.tolist(), ys.tolist()))
    if shape.tag == "mask":
        try:
            runs = [int(v) for v in (shape.get("rle") or "").split(",")]
            left, top = int(shape.get("left", "")), int(shape.get("top", ""))
            width, height = int(shape.get("width", "")), int(shape.get("height", ""))
        except ValueError:
            raise RegproxyError(f"{where}: rle, left, top, width and height must be integers") from None
        _size(width, height, where)
        if min(runs) < 0 or sum(runs) != width * height:
            raise RegproxyError(f"{where}: the rle runs add up to {sum(runs)}, not width x height = "
                                f"{width * height}")
        values = np.arange(len(runs)) % 2  # runs alternate, background first
        mask = np.repeat(values, runs).astype(bool).reshape(height, width)
        return "mask", (left, top, mask)
    raise RegproxyError(f"{where}: unknown CVAT shape <{shape.tag}>")


def _cvat_labels(width: int, height: int, shapes: list, fill: int) -> Callable[[], np.ndarray]:
    def labels() -> np.ndarray:
        picture = Image.new("I", (width, height), fill)
        draw = ImageDraw.Draw(picture)
        for value, (kind, geometry) in shapes:
            if kind == "polygon":
                draw.polygon(geometry, fill=value, outline=value)
            elif kind == "box":
                x0, y0, x1, y1 = geometry
                draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=value, outline=value)
            else:
                left, top, mask = geometry
                _paste(picture, mask, left, top, value)
        return np.asarray(picture, dtype=np.int64)

    return labels


def _zip_pictures(archive: Path) -> dict[str, str]:
    """Image members of a zip by file name (and by path), for exports that carry their pictures."""
    with zipfile.ZipFile(archive) as opened:
        members = [m for m in opened.namelist() if Path(m).suffix.lower() in IMAGE_SUFFIXES]
    found = {}
    for member in members:
        found.setdefault(member, member)
        found.setdefault(Path(member).name, member)
        found.setdefault(Path(member).stem, member)
    return found


def _zip_or_folder(name: str, zipped: dict[str, str], archive: Path | None, folders: list[Path],
                   where: str, allow_outside: bool = False) -> Callable[[], Picture]:
    """A picture from the zip (``archive``, when there is one) or else from the folders; looked up now."""
    relative = name.replace("\\", "/")
    member = None
    if archive is not None:
        member = next((zipped[k] for k in (f"images/{relative}", relative, Path(relative).name) if k in zipped), None)
    if member is not None:
        def from_zip() -> Picture:
            with zipfile.ZipFile(archive) as opened:
                return Path(member).suffix.lower(), opened.read(member)

        return from_zip
    return _located(name, folders, where, allow_outside)


def _read_cvat_masks(source: Path, members: list[str], wanted: list[str] | None, folder: Path,
                     background: str | None) -> Source:
    """A Segmentation mask 1.1 zip: labelmap colours -> classes (``background`` -> 255 unless it is a class)."""
    try:
        with zipfile.ZipFile(source) as archive:
            lines = _parse_labelmap(archive.read("labelmap.txt").decode("utf-8"), source)
    except ZIP_ERRORS as error:
        raise RegproxyError(f"{source}: cannot read labelmap.txt ({one_line(error)})") from None
    names = [name for name, _ in lines if name != CVAT_BACKGROUND]
    classes = _class_ids(names, wanted, background)
    # CVAT's "background" line (its unlabelled pixels) reads as 255 unless it is one of the classes
    maps = read_cvat_zip(source, classes)
    colour_of = dict(lines)
    palette = [colour_of.get(c) for c in classes]
    fill = _fill(classes, background)
    zipped = {Path(m).stem: m for m in members if m.startswith("JPEGImages/")}
    entries = []
    for stem, raw in maps.labels.items():
        what = f"{source}: SegmentationClass/{stem}.png"
        plain_name(stem, what)  # a member 'SegmentationClass/../../x.png' names no file of the dataset
        values = np.where(raw == IGNORE_INDEX, fill, raw)  # unlabelled -> the background class, when one is named
        if stem in zipped:
            member = zipped[stem]

            def picture(member: str = member) -> Picture:
                with zipfile.ZipFile(source) as archive:
                    return Path(member).suffix.lower(), archive.read(member)
        else:
            picture = _by_stem(stem, folder, what)
        entries.append(Entry(stem, what, picture, lambda values=values: values))
    return Source(classes, None if None in palette else palette, entries)


def _by_stem(stem: str, folder: Path, where: str) -> Callable[[], Picture]:
    plain_name(stem, where)
    found = sorted(p for p in folder.glob(f"{glob.escape(stem)}.*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and inside(folder, p)) if folder.is_dir() else []
    if not found:
        raise RegproxyError(f"{where}: no image named {stem}.* in {folder}; point --images at the folder that holds "
                            "it")
    return lambda: found[0]


# ---------------------------------------------------------------------------------------------------- VOC


def read_voc_source(source: Path, wanted: list[str] | None, images: Path | None,
                    background: str | None, *, allow_outside: bool = False) -> Source:
    """Pascal VOC: ``JPEGImages/``, ``SegmentationClass/*.png`` and the ``ImageSets/Segmentation`` lists."""
    candidates = [source, source / "VOC2012", source / "VOCdevkit" / "VOC2012",
                  *sorted(source.glob("VOCdevkit/VOC*")), *sorted(source.glob("VOC*"))]
    base = next((c for c in candidates if (c / "SegmentationClass").is_dir()), None)
    if base is None:
        raise RegproxyError(f"{source}: no SegmentationClass folder (expected VOC's layout, e.g. "
                            f"{source / 'VOCdevkit' / 'VOC2012' / 'SegmentationClass'})")
    classes = list(wanted) if wanted is not None else list(VOC_CLASSES)
    lists = base / "ImageSets" / "Segmentation"
    named: list[tuple[str, str | None]]
    if all((lists / f"{split}.txt").is_file() for split in SPLITS):
        named = []
        for split in SPLITS:
            listed_in = lists / f"{split}.txt"
            try:
                text = listed_in.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise RegproxyError(f"{listed_in}: cannot read the list ({one_line(error)})") from None
            stems = [line.strip() for line in text.splitlines() if line.strip()]
            named += [(plain_name(stem, f"{listed_in}: line {stem!r}"), split) for stem in stems]
    else:  # no lists: every mask, split by the seeded draw
        named = [(p.stem, None) for p in sorted((base / "SegmentationClass").glob("*.png"))]
    folders = [images] if images is not None else [base / "JPEGImages"]
    colours = [tuple(int(v) for v in c) for c in voc_colormap(256)]
    entries = []
    for stem, split in named:
        mask_path = base / "SegmentationClass" / f"{stem}.png"
        if not mask_path.is_file():
            raise RegproxyError(f"{lists / f'{split}.txt'} lists {stem}, but {mask_path} does not exist")
        picture = _by_stem(stem, folders[0], str(mask_path))
        entries.append(Entry(stem, str(mask_path), picture, _voc_labels(mask_path, colours, len(classes)), split))
    return Source(classes, colours[: len(classes)], entries)


def _voc_labels(path: Path, colours: Palette, count: int) -> Callable[[], np.ndarray]:
    def labels() -> np.ndarray:
        values = load_mask(path, colours).astype(np.int64)  # palette indices; an RGB mask is decoded by colour
        bad = (values >= count) & (values != IGNORE_INDEX)
        if bad.any():
            found = sorted(np.unique(values[bad]).tolist())
            raise RegproxyError(f"{path}: value(s) {listed([str(v) for v in found])} are not class ids "
                                f"0..{count - 1} or {IGNORE_INDEX} (ignore)")
        return values

    return labels
