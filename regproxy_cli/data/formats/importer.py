"""Annotation-tool exports -> the folder dataset format (``regproxy data import``).

Each tool's reader (``read_<tool>_source`` in coco.py, labelme.py, cvat.py, voc.py) checks the export and lists its
images; this module chooses the classes and palette, draws the train/val split and writes the folder.

Line-like shapes (labelme lines and points, CVAT polylines, points, skeletons, cuboids, tags) cover no area and
are counted, not painted. Pixels no shape covers get 255 (ignored), or the ``background`` class when one is named.
A label that is not a class, a polygon with fewer than 3 points or non-numeric coordinates, a missing picture or a
picture whose size differs from its annotation stops the import with one line naming the file.

The result is ``classes.yaml`` (names and palette), ``images/{train,val}/<stem><suffix>`` (the pictures copied
unchanged) and ``masks/{train,val}/<stem>.png`` (palette PNGs of class ids). It is written into a hidden folder
beside the destination and renamed onto it at the end, so an import that stops leaves nothing behind.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from regproxy_cli.classes import default_palette
from regproxy_cli.constants import IGNORE_INDEX, IMAGE_SUFFIXES
from regproxy_cli.data.formats.coco import read_coco_source
from regproxy_cli.data.formats.common import ZIP_ERRORS, Entry, Palette, plain_name
from regproxy_cli.data.formats.cvat import read_cvat_source
from regproxy_cli.data.formats.labelme import LABELME_IGNORE, read_labelme_source
from regproxy_cli.data.formats.voc import SPLITS, read_voc_source
from regproxy_cli.errors import RegproxyError, listed, one_line
from regproxy_cli.files import path_under
from regproxy_cli.images import READ_ERRORS, save_label_png

IMPORT_FORMATS = ("labelme", "coco", "cvat", "voc")


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
            else:  # imported here: the datasets module brings torch, which writing annotations does not need
                from regproxy_cli.data.datasets import read_classes_file

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
