"""CVAT: label maps to a "Segmentation mask 1.1" zip (``predict --format cvat``), and CVAT exports back.

Written: ``labelmap.txt``, ``SegmentationClass/<stem>.png`` (class colours), ``SegmentationObject/<stem>.png`` (one
object per class present) and ``ImageSets/Segmentation/default.txt``, laid out as CVAT's exporter does.

Read (``data import --from cvat``): "CVAT for images 1.1" (``annotations.xml``, a folder or zip holding it):
polygons, boxes, ellipses and ``mask`` elements (CVAT's run lengths over the mask's box, first run background)
painted by ``z_order``, then file order; or a Segmentation mask 1.1 zip through :func:`read_cvat_zip`.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
from PIL import Image

from regproxy_cli.constants import IGNORE_INDEX, IMAGE_SUFFIXES
from regproxy_cli.data.formats.common import (
    LINE_SHAPES,
    ZIP_ERRORS,
    Entry,
    LabelMaps,
    Picture,
    Source,
    by_stem,
    check_labels,
    check_size,
    class_ids,
    coordinate,
    fill_value,
    located,
    paint,
    plain_name,
    unknown_label,
)
from regproxy_cli.data.formats.voc import voc_colormap
from regproxy_cli.errors import RegproxyError, one_line

CVAT_HEADER = "# label:color_rgb:parts:actions"
CVAT_BACKGROUND = "background"  # CVAT's exporter adds it, black, when a task has no label of that name


def cvat_name(name: str) -> str:
    return name.replace(":", "_")  # labelmap.txt splits its lines on ':'


def cvat_labelmap(classes: Sequence[str], palette: Sequence[Sequence[int]]) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) per labelmap.txt line: ``background`` (black) first unless a class has that name (as CVAT's
    exporter does), then the classes in id order with their palette colours.

    Colours must tell classes apart: a colour already taken (ADE20K gives road and skyscraper the same grey) or
    black for a class not named background is moved to the next free 24-bit value. ':' in a name becomes '_'.
    """
    names = [cvat_name(n) for n in classes]
    lines: list[tuple[str, tuple[int, int, int]]] = []
    used: set[tuple[int, int, int]] = set()
    if CVAT_BACKGROUND not in names:
        lines.append((CVAT_BACKGROUND, (0, 0, 0)))
        used.add((0, 0, 0))
    for name, colour in zip(names, palette):
        value = (int(colour[0]) << 16) | (int(colour[1]) << 8) | int(colour[2])
        rgb = ((value >> 16) & 255, (value >> 8) & 255, value & 255)
        while rgb in used or (rgb == (0, 0, 0) and name != CVAT_BACKGROUND):
            value = (value + 1) % 2**24
            rgb = ((value >> 16) & 255, (value >> 8) & 255, value & 255)
        used.add(rgb)
        lines.append((name, rgb))
    return lines


def cvat_labelmap_text(lines: Sequence[tuple[str, Sequence[int]]]) -> str:
    """labelmap.txt: the header, then ``name:r,g,b::`` (no parts, no actions) per line."""
    return "\n".join([CVAT_HEADER] + [f"{name}:{','.join(str(int(c)) for c in rgb)}::" for name, rgb in lines]) + "\n"


def cvat_masks(labels: np.ndarray, class_colours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class mask, object mask), both (H, W, 3) uint8 RGB: classes in their labelmap colours; one object per class
    present, numbered 1, 2, ... in class-id order and coloured with the VOC colormap (0, black, is no object).

    Raises:
        RegproxyError: more than 255 classes in one image (the VOC object colormap has 255 objects).
    """
    labels = check_labels(labels)
    present = np.unique(labels)
    if len(present) > 255:
        raise RegproxyError(f"CVAT masks hold at most 255 objects per image, this one has {len(present)} classes")
    objects = np.zeros(int(present.max()) + 1 if len(present) else 1, dtype=np.int64)
    objects[present] = np.arange(1, len(present) + 1)
    return class_colours[labels], voc_colormap()[objects[labels]]


def read_cvat_zip(path: str | os.PathLike[str], classes: Sequence[str] | None = None) -> LabelMaps:
    """A CVAT "Segmentation mask 1.1" zip -> a label map per image, keyed by the stem in ``SegmentationClass``.

    Colours are decoded through ``labelmap.txt``. Without ``classes`` the ids are labelmap line positions
    (``background`` included when it is there); with ``classes`` names are matched (':' read as '_'), and
    ``background``, when it is not one of them, gives 255 (ignore), as do colours the labelmap does not name.

    Raises:
        RegproxyError: no labelmap.txt, a label not in ``classes``, or a file that is not such a zip.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            if "labelmap.txt" not in archive.namelist():
                raise RegproxyError(f"{path}: no labelmap.txt (not a CVAT Segmentation mask 1.1 zip)")
            lines = _parse_labelmap(archive.read("labelmap.txt").decode("utf-8"), path)  # UnicodeDecodeError: below
            names = [name for name, _ in lines]
            if classes is None:
                targets, values = names, list(range(len(names)))
            else:
                targets = list(classes)
                wanted = [cvat_name(c) for c in classes]
                values = []
                for name in names:
                    if name in wanted:
                        values.append(wanted.index(name))
                    elif name == CVAT_BACKGROUND:
                        values.append(IGNORE_INDEX)
                    else:
                        raise RegproxyError(f"{path}: label {name!r} is not one of the classes")
            lookup = {(r << 16) | (g << 8) | b: value for (_, (r, g, b)), value in zip(lines, values)}
            maps = {}
            for member in sorted(archive.namelist()):
                folder, _, file_name = member.partition("/")
                if folder != "SegmentationClass" or not file_name.endswith(".png"):
                    continue
                with Image.open(io.BytesIO(archive.read(member))) as picture:
                    rgb = np.asarray(picture.convert("RGB"), dtype=np.int64)
                codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
                labels = np.full(codes.shape, IGNORE_INDEX, dtype=np.int64)
                for code in np.unique(codes).tolist():
                    if code in lookup:
                        labels[codes == code] = lookup[code]
                maps[file_name[: -len(".png")]] = labels
    except ZIP_ERRORS as error:
        raise RegproxyError(f"{path}: cannot read the zip ({one_line(error)})") from None
    return LabelMaps(targets, maps)


def _parse_labelmap(text: str, where: Any) -> list[tuple[str, tuple[int, int, int]]]:
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        colour = rest.split(":")[0]
        try:
            r, g, b = (int(c) for c in colour.split(","))
        except ValueError:
            raise RegproxyError(f"{where}: labelmap.txt line {line!r} has no r,g,b colour") from None
        if not all(0 <= c <= 255 for c in (r, g, b)):
            raise RegproxyError(f"{where}: labelmap.txt line {line!r}: colour values must be 0..255")
        lines.append((name, (r, g, b)))
    return lines


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
    classes = class_ids(declared + used, wanted, background)
    palette = colours if not used and wanted is None and background is None and None not in colours else None
    skipped: Counter = Counter()
    zipped = _zip_pictures(archive) if archive is not None else {}
    folders = [folder, folder / "images"]
    fill = fill_value(classes, background)
    entries = []
    for image in image_elements:
        name = image.get("name") or ""
        what = f"{where}: image {name!r}"
        try:
            width, height = int(image.get("width", "")), int(image.get("height", ""))
        except ValueError:
            raise RegproxyError(f"{what}: width and height must be integers") from None
        check_size(width, height, what)
        shapes = []
        for order, shape in enumerate(image):
            if shape.tag in LINE_SHAPES:
                skipped[shape.tag] += 1
                continue
            shape_where = f"{what}, <{shape.tag}> {order + 1}"
            label = shape.get("label", "")
            if label not in classes:
                raise unknown_label(shape_where, label, wanted)
            try:
                z_order = int(shape.get("z_order", "0"))
            except ValueError:
                raise RegproxyError(f"{shape_where}: z_order must be an integer") from None
            shapes.append((z_order, order, classes.index(label), _cvat_shape(shape, shape_where)))
        shapes.sort(key=lambda s: s[:2])  # CVAT paints higher z_order on top; file order breaks ties
        picture = _zip_or_folder(name, zipped, archive, folders, what, allow_outside)
        entries.append(Entry(Path(name.replace("\\", "/")).stem, what, picture,
                             partial(paint, width, height, fill, [(v, *s) for _, _, v, s in shapes])))
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
    """A CVAT area shape, checked, as (kind, geometry) for :func:`~regproxy_cli.data.formats.common.paint`."""
    def number(key: str) -> float:
        return coordinate(shape.get(key, ""), f"{where}: {key}")

    if shape.tag == "polygon":
        points = []
        for pair in (shape.get("points") or "").split(";"):
            parts = pair.split(",")
            if len(parts) != 2:
                raise RegproxyError(f"{where}: points must be 'x,y;x,y;...', got {pair!r}")
            points.append((coordinate(parts[0], where), coordinate(parts[1], where)))
        if len(points) < 3:
            raise RegproxyError(f"{where}: a polygon needs at least 3 points, it has {len(points)}")
        return "polygon", points
    if shape.tag == "box":
        return "box", [number("xtl"), number("ytl"), number("xbr"), number("ybr")]
    if shape.tag == "ellipse":
        cx, cy, rx, ry = number("cx"), number("cy"), number("rx"), number("ry")
        angle = math.radians(coordinate(shape.get("rotation", "0"), f"{where}: rotation"))
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
        check_size(width, height, where)
        if min(runs) < 0 or sum(runs) != width * height:
            raise RegproxyError(f"{where}: the rle runs add up to {sum(runs)}, not width x height = "
                                f"{width * height}")
        values = np.arange(len(runs)) % 2  # runs alternate, background first
        mask = np.repeat(values, runs).astype(bool).reshape(height, width)
        return "mask", (left, top, mask)
    raise RegproxyError(f"{where}: unknown CVAT shape <{shape.tag}>")


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
        return _zip_member(archive, member)
    return located(name, folders, where, allow_outside)


def _zip_member(archive: Path, member: str) -> Callable[[], Picture]:
    """The picture ``member`` of ``archive``, read when the import copies it (not held in memory till then)."""
    def picture() -> Picture:
        with zipfile.ZipFile(archive) as opened:
            return Path(member).suffix.lower(), opened.read(member)

    return picture


def _read_cvat_masks(source: Path, members: list[str], wanted: list[str] | None, folder: Path,
                     background: str | None) -> Source:
    """A Segmentation mask 1.1 zip: labelmap colours -> classes (``background`` -> 255 unless it is a class)."""
    try:
        with zipfile.ZipFile(source) as archive:
            lines = _parse_labelmap(archive.read("labelmap.txt").decode("utf-8"), source)
    except ZIP_ERRORS as error:
        raise RegproxyError(f"{source}: cannot read labelmap.txt ({one_line(error)})") from None
    names = [name for name, _ in lines if name != CVAT_BACKGROUND]
    classes = class_ids(names, wanted, background)
    # CVAT's "background" line (its unlabelled pixels) reads as 255 unless it is one of the classes
    maps = read_cvat_zip(source, classes)
    colour_of = dict(lines)
    palette = [colour_of.get(c) for c in classes]
    fill = fill_value(classes, background)
    zipped = {Path(m).stem: m for m in members if m.startswith("JPEGImages/")}
    entries = []
    for stem, raw in maps.labels.items():
        what = f"{source}: SegmentationClass/{stem}.png"
        plain_name(stem, what)  # a member 'SegmentationClass/../../x.png' names no file of the dataset
        values = np.where(raw == IGNORE_INDEX, fill, raw)  # unlabelled -> the background class, when one is named
        picture = _zip_member(source, zipped[stem]) if stem in zipped else by_stem(stem, folder, what)
        entries.append(Entry(stem, what, picture, lambda values=values: values))
    return Source(classes, None if None in palette else palette, entries)
