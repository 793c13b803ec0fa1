"""Label maps to and from annotation tools: COCO RLE, labelme polygons and CVAT's "Segmentation mask 1.1" zip.

Writers turn a dense label map (every pixel a class id, as ``predict_labels`` returns) into each tool's format;
``AnnotationWriter`` collects a whole run (``regproxy predict --format``). Readers turn the files back into label
maps; they are what importing annotations made in these tools will use.

* **COCO** (``predictions.json``): one annotation per class present in an image, its ``segmentation`` a
  compressed RLE (pycocotools' ``mask.encode`` on a Fortran-ordered uint8 mask, ``counts`` as a str),
  ``iscrowd: 1`` as COCO requires for RLE, ``area`` and ``bbox`` from pycocotools. ``category_id`` is the class id
  (0..K-1, the value in the label PNG), the categories are the model's classes.
* **labelme** (``<stem>.json`` per image): one polygon per connected region (OpenCV ``findContours`` with
  ``RETR_CCOMP``, simplified with ``approxPolyDP``). labelme polygons have no holes, so a region's polygon is its
  outer boundary and its holes are drawn by the regions inside them: shapes are listed by decreasing filled area,
  and painting them in order, later over earlier (as labelme's ``shapes_to_label`` does), gives the map back.
  A region nested in another's hole is strictly smaller than it, so it always comes later.
* **CVAT** (one ``<name>.zip``): ``labelmap.txt``, ``SegmentationClass/<stem>.png`` (class colours),
  ``SegmentationObject/<stem>.png`` (one object per class present) and ``ImageSets/Segmentation/default.txt``,
  laid out as CVAT's Segmentation mask 1.1 exporter does.

pycocotools and OpenCV are optional (``pip install 'regproxy[annotations]'``) and imported only when needed.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import tempfile
import threading
import weakref
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from regproxy_cli.constants import IGNORE_INDEX, VERSION
from regproxy_cli.errors import RegproxyError, listed, one_line
from regproxy_cli.files import write_atomic

if TYPE_CHECKING:
    from typing_extensions import Self

ANNOTATION_FORMATS = ("coco", "labelme", "cvat")
COCO_FILE = "predictions.json"
LABELME_VERSION = "5.5.0"  # the labelme release whose JSON layout these files follow
CVAT_HEADER = "# label:color_rgb:parts:actions"
CVAT_BACKGROUND = "background"  # CVAT's exporter adds it, black, when a task has no label of that name
_NEEDS = {"coco": "pycocotools.mask", "labelme": "cv2"}  # cvat needs only PIL and zipfile
# What a damaged or hostile zip raises on reading: bad headers, a corrupt deflate stream, an encrypted or
# unsupported member (RuntimeError, NotImplementedError), text that is not UTF-8.
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError, ValueError)


class LabelMaps(NamedTuple):
    """Label maps read from an annotation file: ``labels[key]`` holds ids into ``classes``."""

    classes: list[str]
    labels: dict[str, np.ndarray]


def _require(module: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RegproxyError(f"{purpose} needs the 'annotations' extra: pip install 'regproxy[annotations]'") from None


def check_formats(formats: Iterable[str]) -> list[str]:
    """The requested formats as plain names, checked: known, and their optional packages importable.

    Raises:
        RegproxyError: one line naming the format whose extra is missing, or an unknown format.
    """
    names = [str(getattr(f, "value", f)) for f in formats]
    unknown = [n for n in names if n not in ("png", *ANNOTATION_FORMATS)]
    if unknown:
        raise RegproxyError(f"unknown --format {listed(unknown)}; choose from png, {', '.join(ANNOTATION_FORMATS)}")
    for name in names:
        if name in _NEEDS:
            _require(_NEEDS[name], f"--format {name}")
    return names


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got shape {labels.shape} and dtype {labels.dtype}")
    return labels


# ---------------------------------------------------------------------------------------------------- COCO


def encode_coco(labels: np.ndarray) -> dict[int, dict[str, Any]]:
    """One COCO RLE per class present: {class id: {"size": [H, W], "counts": str}} (class ids ascending)."""
    mask_utils = _require("pycocotools.mask", "COCO RLE")
    labels = _check_labels(labels)
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
    mask_utils = _require("pycocotools.mask", "COCO RLE")
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
    mask_utils = _require("pycocotools.mask", "reading COCO RLE")
    document = source if isinstance(source, dict) else _read_json(source)
    where = "COCO data" if isinstance(source, dict) else str(source)
    categories = sorted(document.get("categories", []), key=lambda c: c["id"])
    names = [c["name"] for c in categories]
    targets = list(names) if classes is None else list(classes)
    value_of = {}
    for category in categories:
        if category["name"] not in targets:
            raise RegproxyError(f"{where}: category {category['name']!r} is not one of the classes")
        value_of[category["id"]] = targets.index(category["name"])
    images, maps = {}, {}
    for image in document.get("images", []):
        if image["file_name"] in maps:
            raise RegproxyError(f"{where}: two images are named {image['file_name']!r}")
        images[image["id"]] = image
        maps[image["file_name"]] = np.full((image["height"], image["width"]), IGNORE_INDEX, dtype=np.int64)
    for annotation in document.get("annotations", []):
        image = images[annotation["image_id"]]
        height, width = image["height"], image["width"]
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        mask = mask_utils.decode(rle).astype(bool)
        maps[image["file_name"]][mask] = value_of[annotation["category_id"]]
    return LabelMaps(targets, maps)


# ---------------------------------------------------------------------------------------------------- labelme


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
    cv2 = _require("cv2", "labelme polygons")
    labels = _check_labels(labels)
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
    labels = _check_labels(labels)
    shapes = [{"label": classes[class_id], "points": points.tolist(), "group_id": None, "shape_type": "polygon",
               "flags": {}} for class_id, points in label_polygons(labels, tolerance)]
    return {"version": LABELME_VERSION, "flags": {}, "shapes": shapes, "imagePath": image_path, "imageData": None,
            "imageHeight": int(labels.shape[0]), "imageWidth": int(labels.shape[1])}


def read_labelme(source: str | os.PathLike[str] | dict, classes: Sequence[str]) -> np.ndarray:
    """A labelme JSON document -> (H, W) label map (ids into ``classes``; 255 where no shape is).

    Shapes are painted in file order, later over earlier, as labelme's ``shapes_to_label`` does: polygons and
    rectangles filled with their outline (PIL), other shape types are refused.

    Raises:
        RegproxyError: a label not in ``classes``, a shape type other than polygon or rectangle, a bad file.
    """
    document = source if isinstance(source, dict) else _read_json(source)
    where = "labelme data" if isinstance(source, dict) else str(source)
    picture = Image.new("I", (int(document["imageWidth"]), int(document["imageHeight"])), IGNORE_INDEX)
    draw = ImageDraw.Draw(picture)
    for shape in document.get("shapes", []):
        if shape["label"] not in classes:
            raise RegproxyError(f"{where}: label {shape['label']!r} is not one of the classes")
        value = list(classes).index(shape["label"])
        kind = shape.get("shape_type") or "polygon"
        points = [tuple(map(float, p)) for p in shape["points"]]
        if kind == "polygon" and len(points) >= 3:
            draw.polygon(points, fill=value, outline=value)
        elif kind == "rectangle" and len(points) == 2:
            (x0, y0), (x1, y1) = points
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=value, outline=value)
        else:
            raise RegproxyError(f"{where}: cannot rasterise a {kind} shape with {len(points)} points")
    return np.asarray(picture, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------- CVAT


def voc_colormap(count: int = 256) -> np.ndarray:
    """(count, 3) uint8 Pascal VOC colours (index bits spread over the channels), CVAT's object colours."""
    index = np.arange(count)
    colours = np.zeros((count, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((index >> channel) & 1) << shift
        index = index >> 3
    return colours.astype(np.uint8)


def _cvat_name(name: str) -> str:
    return name.replace(":", "_")  # labelmap.txt splits its lines on ':'


def cvat_labelmap(classes: Sequence[str], palette: Sequence[Sequence[int]]) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) per labelmap.txt line: ``background`` (black) first unless a class has that name (as CVAT's
    exporter does), then the classes in id order with their palette colours.

    Colours must tell classes apart: a colour already taken (ADE20K gives road and skyscraper the same grey) or
    black for a class not named background is moved to the next free 24-bit value. ':' in a name becomes '_'.
    """
    names = [_cvat_name(n) for n in classes]
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
    labels = _check_labels(labels)
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
                wanted = [_cvat_name(c) for c in classes]
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


def _read_json(path: str | os.PathLike[str]) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RegproxyError(f"{path}: cannot read the JSON ({error})") from None


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_json(path: Path, document: dict) -> None:
    try:
        write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(document, separators=(",", ":")),
                                                            encoding="utf-8"))
    except OSError as error:
        raise RegproxyError(f"{path}: cannot write ({error})") from None


# ---------------------------------------------------------------------------------------------------- a run


class AnnotationWriter:
    """Writes the label maps of a run in the requested annotation formats (``png`` is left to the caller).

    ``add`` takes one image at a time (from several threads too) and writes labelme's ``<stem>.json`` at once;
    COCO's ``predictions.json`` and CVAT's ``<cvat_name>.zip`` are written atomically by ``close``, once. The
    zip's masks are spooled to a hidden temporary file in ``out_dir`` meanwhile, so memory stays flat.

    Args:
        out_dir: where the files go (it must exist).
        formats: any of "png", "coco", "labelme", "cvat" (or enum members with those values).
        classes, palette: the model's class names and (r, g, b) colours, class id order.
        polygon_tolerance: labelme's ``approxPolyDP`` tolerance in pixels (0: exact boundaries).
        cvat_name: the CVAT zip's file name, without ``.zip``.

    Raises:
        RegproxyError: a format's optional package is missing (one line naming the extra).
    """

    def __init__(self, out_dir: str | os.PathLike[str], formats: Iterable[str], classes: Sequence[str],
                 palette: Sequence[Sequence[int]], *, polygon_tolerance: float = 1.0, cvat_name: str = "cvat") -> None:
        self.formats = set(check_formats(formats)) & set(ANNOTATION_FORMATS)
        if polygon_tolerance < 0:
            raise RegproxyError(f"--polygon-tolerance must be at least 0, got {polygon_tolerance}")
        self.out_dir = Path(out_dir)
        self.classes = list(classes)
        self.tolerance = polygon_tolerance
        self.coco_path = self.out_dir / COCO_FILE
        self.cvat_path = self.out_dir / f"{cvat_name}.zip"
        self._lock = threading.Lock()
        self._coco: dict[str, tuple[dict, list[dict]]] = {}  # stem -> (image entry, annotations without ids)
        self._stems: set[str] = set()
        self._labelmap = cvat_labelmap(self.classes, palette)
        offset = len(self._labelmap) - len(self.classes)  # the background line, when there is one
        self._colours = np.array([rgb for _, rgb in self._labelmap[offset:]], dtype=np.uint8).reshape(-1, 3)
        self._zip = None
        if "cvat" in self.formats:
            fd, spool = tempfile.mkstemp(dir=self.out_dir, prefix=f".{self.cvat_path.name}.", suffix=".spool")
            os.close(fd)
            self._spool = Path(spool)
            self._cleanup = weakref.finalize(self, self._spool.unlink, missing_ok=True)  # if close never runs
            self._zip = zipfile.ZipFile(self._spool, "w")

    def add(self, stem: str, labels: np.ndarray, image_path: str | os.PathLike[str]) -> list[Path]:
        """Record one image's label map under ``stem``; returns the files written now (labelme's JSON).

        Raises:
            RegproxyError: ``stem`` was added before, or a file cannot be written.
        """
        labels = _check_labels(labels)
        if not self.formats:
            return []
        image_path = Path(image_path)
        coco = cvat = None
        if "coco" in self.formats:
            height, width = labels.shape
            # the stem (unique in a run: predict prefixes the folder to a repeated one) with the image's suffix
            coco = ({"file_name": stem + image_path.suffix, "height": int(height), "width": int(width)},
                    coco_annotations(labels, image_id=0))
        if "cvat" in self.formats:
            class_mask, object_mask = cvat_masks(labels, self._colours)
            cvat = _png_bytes(class_mask), _png_bytes(object_mask)
        with self._lock:
            if stem in self._stems:
                raise RegproxyError(f"{image_path}: another image already gave the output name {stem!r}")
            self._stems.add(stem)
            if coco is not None:
                self._coco[stem] = coco
            if cvat is not None:
                self._zip.writestr(f"SegmentationClass/{stem}.png", cvat[0])
                self._zip.writestr(f"SegmentationObject/{stem}.png", cvat[1])
        written = []
        if "labelme" in self.formats:
            json_path = self.out_dir / f"{stem}.json"
            relative = os.path.relpath(image_path.resolve(), self.out_dir.resolve())
            _write_json(json_path, labelme_document(labels, self.classes, Path(relative).as_posix(), self.tolerance))
            written.append(json_path)
        return written

    def close(self) -> list[Path]:
        """Write COCO's ``predictions.json`` and the CVAT zip (images in stem order); returns the files written.
        Nothing is written for a run without images."""
        written = []
        stems = sorted(self._stems)
        if "coco" in self.formats and stems:
            images, annotations = [], []
            for image_id, stem in enumerate(stems, start=1):
                entry, entries = self._coco[stem]
                images.append({"id": image_id, **entry})
                for item in entries:
                    annotations.append({**item, "id": len(annotations) + 1, "image_id": image_id})
            _write_json(self.coco_path, {
                "info": {"description": "regproxy predictions", "version": VERSION}, "licenses": [],
                "images": images, "annotations": annotations, "categories": coco_categories(self.classes)})
            written.append(self.coco_path)
        if self._zip is not None:
            archive, self._zip = self._zip, None
            if stems:
                archive.writestr("labelmap.txt", cvat_labelmap_text(self._labelmap))
                archive.writestr("ImageSets/Segmentation/default.txt", "".join(f"{s}\n" for s in stems))
            archive.close()
            if stems:
                try:
                    write_atomic(self.cvat_path, lambda tmp: os.replace(self._spool, tmp))
                except OSError as error:
                    raise RegproxyError(f"{self.cvat_path}: cannot write ({error})") from None
                written.append(self.cvat_path)
            self._cleanup()
        return written

    def discard(self) -> None:
        """Drop what ``close`` would have written (the labelme files already written stay)."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None
            self._cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()
