"""labelme: label maps to polygons (``predict --format labelme``) and labelme JSON back to label maps.

Written: one polygon per connected region (OpenCV ``findContours`` with ``RETR_CCOMP``, simplified with
``approxPolyDP``). labelme polygons have no holes, so a region's polygon is its outer boundary and its holes are
drawn by the regions inside them: shapes are listed by decreasing filled area, and painting them in order, later
over earlier (as labelme's ``shapes_to_label`` does), gives the map back. A region nested in another's hole is
strictly smaller than it, so it always comes later. OpenCV is optional (the 'annotations' extra).

Read (``data import --from labelme``): shapes painted in file order, later over earlier: polygons and rectangles
filled with their outline (PIL), circles (centre + a point on the circle) and ``mask`` shapes (a base64 PNG over
the two points' box); a hole is drawn by a later shape inside an earlier one. The label ``__ignore__`` paints 255,
as labelme's ``labelme2voc`` reads it. The picture is ``imagePath`` (next to the JSON) or, failing that,
``imageData``.
"""

from __future__ import annotations

import copy
import io
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from regproxy_cli.constants import IGNORE_INDEX, IMAGE_SUFFIXES
from regproxy_cli.data.formats.common import (
    LINE_SHAPES,
    Entry,
    Picture,
    Source,
    check_labels,
    check_size,
    class_ids,
    decode_base64,
    fill_value,
    find_picture,
    missing_picture,
    paint,
    point_pairs,
    require,
    unknown_label,
)
from regproxy_cli.errors import RegproxyError, one_line
from regproxy_cli.files import read_json
from regproxy_cli.images import READ_ERRORS

LABELME_VERSION = "5.5.0"  # the labelme release whose JSON layout these files follow
LABELME_IGNORE = "__ignore__"  # labelme2voc's name for "do not train on these pixels"


def label_polygons(labels: np.ndarray, tolerance: float = 1.0) -> list[tuple[int, np.ndarray]]:
    """One polygon per connected region (8-connected), as (class id, (N, 2) float x, y points), in painting order.

    Points are pixel centres on the region's outer boundary (``cv2.findContours``, ``RETR_CCOMP``: every region's
    outer boundary at the top level, holes below), simplified by ``cv2.approxPolyDP`` with ``tolerance`` pixels
    (0: the exact boundary). Holes get no polygon of their own: the order is by decreasing filled area (region
    plus holes), so the regions inside a hole come after the region around it and paint it back. Painted in this
    order (each polygon filled with its outline), tolerance 0 gives the label map exactly, except where two
    regions cross at a pixel corner (8-connected both ways). A region with fewer than 3 points after
    simplification (a pixel, a straight 1-pixel line) repeats its points, as a labelme polygon needs 3.
    """
    cv2 = require("cv2", "labelme polygons")
    labels = check_labels(labels)
    if tolerance < 0:
        raise ValueError(f"tolerance must be at least 0, got {tolerance}")
    found = []
    for class_id in np.unique(labels).tolist():
        mask = (labels == class_id).astype(np.uint8)
        contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        for contour, (_, _, _, parent) in zip(contours, hierarchy[0]):
            if parent != -1:
                continue  # a hole: painted by the regions inside it
            x, y, w, h = cv2.boundingRect(contour)
            filled = np.zeros((h, w), dtype=np.uint8)
            cv2.drawContours(filled, [contour], 0, 1, thickness=-1, offset=(-x, -y))
            if tolerance > 0:
                contour = cv2.approxPolyDP(contour, tolerance, True)
            points = contour.reshape(-1, 2).astype(np.float64)
            if len(points) < 3:
                points = np.concatenate([points] * 3)[:3]
            found.append((-int(filled.sum()), int(class_id), len(found), points))
    found.sort(key=lambda item: item[:3])
    return [(class_id, points) for _, class_id, _, points in found]


def labelme_document(labels: np.ndarray, classes: Sequence[str], image_path: str, tolerance: float = 1.0) -> dict:
    """A labelme JSON document: the polygons of ``label_polygons`` (in its painting order) labelled by class name.

    ``image_path`` is stored as ``imagePath`` (labelme resolves it relative to the JSON file); ``imageData`` is
    null, so labelme reads the picture from there.
    """
    labels = check_labels(labels)
    shapes = [{"label": classes[class_id], "points": points.tolist(), "group_id": None, "shape_type": "polygon",
               "flags": {}} for class_id, points in label_polygons(labels, tolerance)]
    return {"version": LABELME_VERSION, "flags": {}, "shapes": shapes, "imagePath": image_path, "imageData": None,
            "imageHeight": int(labels.shape[0]), "imageWidth": int(labels.shape[1])}


def read_labelme(source: str | os.PathLike[str] | dict, classes: Sequence[str]) -> np.ndarray:
    """A labelme JSON document -> (H, W) label map (ids into ``classes``; 255 where no shape is).

    Painted as ``data import --from labelme`` paints (see the module docstring): the same checks, the same shapes.

    Raises:
        RegproxyError: a label not in ``classes``, a shape labelme cannot draw, a bad file.
    """
    # checking fills in shape_type and float points: a caller's dict stays as it was
    document = copy.deepcopy(source) if isinstance(source, dict) else read_json(source)
    where = "labelme data" if isinstance(source, dict) else str(source)
    document = _checked_document(document, where)
    for shape in document["shapes"]:
        if shape["shape_type"] not in LINE_SHAPES and shape["label"] not in (LABELME_IGNORE, *classes):
            raise RegproxyError(f"{where}: label {shape['label']!r} is not one of the classes")
    return _labelme_labels(document, list(classes), IGNORE_INDEX, where)()


def read_labelme_source(source: Path, wanted: list[str] | None, images: Path | None,
                        background: str | None, *, allow_outside: bool = False) -> Source:
    """A folder of labelme JSON files (or one file) -> the images to import."""
    files = [source] if source.is_file() else sorted(source.glob("*.json"))
    if not files:
        raise RegproxyError(f"{source}: no labelme *.json files")
    documents = {path: _checked_document(read_json(path), str(path)) for path in files}  # checked up front, before anything is drawn
    names = sorted({shape["label"] for document in documents.values() for shape in document["shapes"]
                    if shape["shape_type"] not in LINE_SHAPES and shape["label"] != LABELME_IGNORE})
    classes = class_ids(names, wanted, background)
    skipped: Counter = Counter()
    for path, document in documents.items():
        for shape in document["shapes"]:
            if shape["shape_type"] in LINE_SHAPES:
                skipped[shape["shape_type"]] += 1
            elif shape["label"] != LABELME_IGNORE and shape["label"] not in classes:
                raise unknown_label(str(path), shape["label"], wanted)
    fill = fill_value(classes, background)
    entries = [Entry(path.stem, str(path), _labelme_picture(path, document, images, allow_outside),
                     _labelme_labels(document, classes, fill, str(path)))
               for path, document in documents.items()]
    return Source(classes, None, entries, skipped)


def _checked_document(document: Any, where: str) -> dict:
    """Check one labelme document (``where`` names it in errors); shapes get a ``shape_type`` and checked float
    ``points``."""
    if not isinstance(document, dict) or not isinstance(document.get("shapes"), list):
        raise RegproxyError(f"{where}: not a labelme file (no 'shapes' list)")
    for key in ("imageHeight", "imageWidth"):
        value = document.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RegproxyError(f"{where}: {key} must be a positive integer, got {value!r}")
    check_size(document["imageWidth"], document["imageHeight"], where)
    for number, shape in enumerate(document["shapes"], start=1):
        at = f"{where}: shape {number}"
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            raise RegproxyError(f"{at}: no label")
        kind = shape.get("shape_type") or "polygon"
        if not isinstance(kind, str):
            raise RegproxyError(f"{at}: shape_type must be a string, got {kind!r}")
        shape["shape_type"] = kind
        at = f"{at} ({shape['label']!r}, {kind})"
        points = point_pairs(shape.get("points"), at)
        shape["points"] = points
        if kind in LINE_SHAPES:
            continue
        needed = {"polygon": 3, "rectangle": 2, "circle": 2, "mask": 2}.get(kind)
        if needed is None:
            raise RegproxyError(f"{at}: unknown shape type; labelme draws polygon, rectangle, circle, mask, "
                                "line, linestrip, point")
        if kind == "polygon" and len(points) < 3:
            raise RegproxyError(f"{at}: a polygon needs at least 3 points, it has {len(points)}")
        if kind != "polygon" and len(points) != 2:
            raise RegproxyError(f"{at}: needs 2 points, it has {len(points)}")
        if kind == "mask" and not isinstance(shape.get("mask"), str):
            raise RegproxyError(f"{at}: no base64 'mask' PNG")
    return document


def _labelme_picture(path: Path, document: dict, images: Path | None,
                     allow_outside: bool = False) -> Callable[[], Picture]:
    def picture() -> Picture:
        name = document.get("imagePath") or ""
        if not isinstance(name, str):
            raise RegproxyError(f"{path}: imagePath must be a string, got {name!r}")
        folders = [images] if images is not None else [path.parent]
        found = find_picture(name, folders, allow_outside) if name else None
        if found is not None:
            return found
        if document.get("imageData"):
            data = decode_base64(document["imageData"], str(path), "imageData")
            suffix = Path(name.replace("\\", "/")).suffix.lower()
            if suffix not in IMAGE_SUFFIXES:
                suffix = _image_suffix(data, str(path))
            return suffix, data
        raise missing_picture(str(path), name, folders)

    return picture


def _labelme_labels(document: dict, classes: list[str], fill: int, where: str) -> Callable[[], np.ndarray]:
    def shapes() -> Iterator[tuple[int, str, Any]]:
        for shape in document["shapes"]:
            kind, points = shape["shape_type"], shape["points"]
            if kind in LINE_SHAPES:
                continue
            value = IGNORE_INDEX if shape["label"] == LABELME_IGNORE else classes.index(shape["label"])
            if kind == "polygon":
                yield value, "polygon", points
            elif kind == "rectangle":
                yield value, "box", [*points[0], *points[1]]
            elif kind == "circle":  # the centre, then a point on the circle
                (cx, cy), (px, py) = points
                radius = math.hypot(cx - px, cy - py)
                yield value, "ellipse", [cx - radius, cy - radius, cx + radius, cy + radius]
            else:  # mask: a binary PNG whose top-left pixel sits at the first point
                mask = _png_mask(shape["mask"], where)
                (x0, y0), _ = points
                yield value, "mask", (int(x0), int(y0), mask)

    return lambda: paint(document["imageWidth"], document["imageHeight"], fill, shapes())


def _png_mask(text: str, where: str) -> np.ndarray:
    data = decode_base64(text, where, "mask")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("L")) > 0
    except READ_ERRORS as error:
        raise RegproxyError(f"{where}: a mask shape is not a PNG ({one_line(error)})") from None


def _image_suffix(data: bytes, where: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = (image.format or "").lower()
    except READ_ERRORS as error:
        raise RegproxyError(f"{where}: imageData is not an image ({one_line(error)})") from None
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(kind, f".{kind}")
