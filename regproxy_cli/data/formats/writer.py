"""A run's predictions in the annotation tools' formats (``regproxy predict --format coco|labelme|cvat``).

The per-tool encoders live in coco.py, labelme.py and cvat.py; ``AnnotationWriter`` collects a whole run and writes
their files. pycocotools and OpenCV are optional (``pip install 'regproxy[annotations]'``), imported when needed.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import weakref
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from regproxy_cli.constants import VERSION
from regproxy_cli.data.formats.coco import COCO_FILE, coco_annotations, coco_categories
from regproxy_cli.data.formats.common import check_labels, require
from regproxy_cli.data.formats.cvat import cvat_labelmap, cvat_labelmap_text, cvat_masks
from regproxy_cli.data.formats.labelme import labelme_document
from regproxy_cli.errors import RegproxyError, listed
from regproxy_cli.files import write_atomic, write_text_atomic

if TYPE_CHECKING:
    from typing_extensions import Self

ANNOTATION_FORMATS = ("coco", "labelme", "cvat")
_NEEDS = {"coco": "pycocotools.mask", "labelme": "cv2"}  # cvat needs only PIL and zipfile


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
            require(_NEEDS[name], f"--format {name}")
    return names


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_json(path: Path, document: dict) -> None:
    try:
        write_text_atomic(path, json.dumps(document, separators=(",", ":")))
    except OSError as error:
        raise RegproxyError(f"{path}: cannot write ({error})") from None


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
        labels = check_labels(labels)
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
