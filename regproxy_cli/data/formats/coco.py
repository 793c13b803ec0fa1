"""COCO: label maps to instances JSON (``predict --format coco``) and back (``read_coco``, ``data import --from coco``).

Written: one annotation per class present in an image, its ``segmentation`` a compressed RLE (pycocotools'
``mask.encode`` on a Fortran-ordered uint8 mask, ``counts`` as a str), ``iscrowd: 1`` as COCO requires for RLE,
``area`` and ``bbox`` from pycocotools. ``category_id`` is the class id (0..K-1, the value in the label PNG).

Read: polygons are rasterised by pycocotools (one polygon's crossings by the even-odd rule, so a polygon that walks
round a hole and back keeps it; several polygons of an annotation are united), RLEs (``iscrowd`` ones, compressed
or not) decoded by pycocotools; annotations painted in file order. pycocotools is optional (the 'annotations' extra).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from regproxy_cli.constants import IGNORE_INDEX
from regproxy_cli.data.formats.common import (
    Entry,
    LabelMaps,
    Source,
    check_labels,
    check_size,
    class_ids,
    coordinate,
    fill_value,
    located,
    require,
    unknown_label,
)
from regproxy_cli.errors import RegproxyError, one_line
from regproxy_cli.files import read_json

COCO_FILE = "predictions.json"


def encode_coco(labels: np.ndarray) -> dict[int, dict[str, Any]]:
    """One COCO RLE per class present: {class id: {"size": [H, W], "counts": str}} (class ids ascending)."""
    mask_utils = require("pycocotools.mask", "COCO RLE")
    labels = check_labels(labels)
    rles = {}
    for class_id in np.unique(labels).tolist():
        rle = mask_utils.encode(np.asfortranarray(labels == class_id, dtype=np.uint8))
        rles[int(class_id)] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return rles


def coco_annotations(labels: np.ndarray, image_id: int, first_id: int = 1) -> list[dict[str, Any]]:
    """COCO ``annotations`` entries for one label map: one per class present, ids from ``first_id``.

    ``category_id`` is the class id itself (0..K-1, the value in the label map); ``segmentation`` is an RLE, so
    ``iscrowd`` is 1; ``area`` (pixels) and ``bbox`` ([x, y, w, h]) are pycocotools' own.
    """
    mask_utils = require("pycocotools.mask", "COCO RLE")
    entries = []
    for offset, (class_id, rle) in enumerate(encode_coco(labels).items()):
        as_bytes = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        entries.append({
            "id": first_id + offset, "image_id": image_id, "category_id": class_id, "segmentation": rle,
            "area": int(mask_utils.area(as_bytes)), "bbox": [float(v) for v in mask_utils.toBbox(as_bytes)],
            "iscrowd": 1,
        })
    return entries


def coco_categories(classes: Sequence[str]) -> list[dict[str, Any]]:
    """COCO ``categories``: id = class id (0..K-1, as in the label maps), name = class name."""
    return [{"id": i, "name": name, "supercategory": ""} for i, name in enumerate(classes)]


def read_coco(source: str | os.PathLike[str] | dict, classes: Sequence[str] | None = None) -> LabelMaps:
    """COCO instances (RLE or polygon segmentations) -> a label map per image, keyed by ``file_name``.

    Annotations are painted in file order, later over earlier; pixels no annotation covers get 255 (ignore).
    Without ``classes`` the ids are positions in the categories sorted by id (for files ``regproxy`` writes, the
    class ids themselves); with ``classes`` categories are matched by name.

    Raises:
        RegproxyError: a category not in ``classes``, two images with one file name, or an unreadable file.
    """
    mask_utils = require("pycocotools.mask", "reading COCO RLE")
    document = source if isinstance(source, dict) else read_json(source)
    where = "COCO data" if isinstance(source, dict) else str(source)
    names, images = _parse(document, where, None, None)
    targets = list(names) if classes is None else list(classes)
    for name in names:  # every category, used or not, must be a class
        if name not in targets:
            raise RegproxyError(f"{where}: category {name!r} is not one of the classes")
    maps = {}
    for image, _, found in images:
        if image["file_name"] in maps:
            raise RegproxyError(f"{where}: two images are named {image['file_name']!r}")
        found = [(targets.index(names[value]), segmentation, what) for value, segmentation, what in found]
        maps[image["file_name"]] = _coco_labels(mask_utils, image, found, IGNORE_INDEX)()
    return LabelMaps(targets, maps)


def read_coco_source(source: Path, wanted: list[str] | None, images: Path | None,
                     background: str | None, *, allow_outside: bool = False) -> Source:
    """A COCO instances JSON -> the images to import (pictures under ``images``, default the JSON's folder)."""
    if not source.is_file():
        raise RegproxyError(f"{source}: --from coco reads a COCO JSON file, not a folder")
    mask_utils = require("pycocotools.mask", "--from coco")
    classes, images_found = _parse(read_json(source), str(source), wanted, background)
    pictures = [images] if images is not None else [source.parent]
    fill = fill_value(classes, background)
    entries = []
    for image, where, found in images_found:
        name = image["file_name"]
        entries.append(Entry(Path(name.replace("\\", "/")).stem, where, located(name, pictures, where, allow_outside),
                             _coco_labels(mask_utils, image, found, fill)))
    return Source(classes, None, entries)


def _parse(document: Any, where: str, wanted: list[str] | None,
           background: str | None) -> tuple[list[str], list[tuple[dict, str, list]]]:
    """Check a COCO document: the classes, and per image (image, where, [(class id, segmentation, where), ...])."""
    if not isinstance(document, dict) or not all(isinstance(document.get(k), list)
                                                 for k in ("images", "annotations", "categories")):
        raise RegproxyError(f"{where}: not a COCO file (needs 'images', 'annotations' and 'categories' lists)")
    category_names = {}
    for category in document["categories"]:
        if not isinstance(category, dict) or not isinstance(category.get("name"), str) or \
                isinstance(category.get("id"), bool) or not isinstance(category.get("id"), int):
            raise RegproxyError(f"{where}: a category without an integer id and a name: {category!r}")
        category_names[category["id"]] = category["name"]
    names = [category_names[i] for i in sorted(category_names)]
    classes = class_ids(names, wanted, background)
    entries_by_id: dict[Any, tuple[dict, str, list]] = {}
    for image in document["images"]:
        at = f"{where}: image {image.get('file_name', image.get('id'))!r}" if isinstance(image, dict) else ""
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or \
                not isinstance(image.get("id"), (int, str)):
            raise RegproxyError(f"{where}: an image without an id and a file_name: {image!r}")
        for key in ("height", "width"):
            if isinstance(image.get(key), bool) or not isinstance(image.get(key), int) or image[key] < 1:
                raise RegproxyError(f"{at}: {key} must be a positive integer")
        check_size(image["width"], image["height"], at)
        entries_by_id[image["id"]] = (image, at, [])
    for annotation in document["annotations"]:
        if not isinstance(annotation, dict) or not isinstance(annotation.get("image_id"), (int, str)) or \
                annotation["image_id"] not in entries_by_id:
            raise RegproxyError(f"{where}: annotation {_annotation_id(annotation)} names no image of the file")
        image, at, found = entries_by_id[annotation["image_id"]]
        what = f"{at}, annotation {_annotation_id(annotation)}"
        category = annotation.get("category_id")
        if isinstance(category, bool) or not isinstance(category, int) or category not in category_names:
            raise RegproxyError(f"{what}: category_id {category!r} is not among the categories")
        if category_names[category] not in classes:
            raise unknown_label(what, category_names[category], wanted)
        segmentation = _coco_segmentation(annotation.get("segmentation"), image["height"], image["width"], what)
        if segmentation is not None:
            found.append((classes.index(category_names[category]), segmentation, what))
    return classes, list(entries_by_id.values())


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
            numbers = [coordinate(v, where) for v in polygon]
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
