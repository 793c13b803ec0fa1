"""Segmentation datasets in the layouts mmsegmentation 0.17 reads, plus a simple folder format for user data.

Every dataset yields ``(image, label, name)``: an RGB uint8 HxWx3 numpy image, a uint8 HxW numpy label of
train ids with 255 for ignored pixels, and the sample's name (the file stem). With a ``transform`` the pair is
passed through it first, e.g. :func:`regproxy_cli.data.transforms.train_pipeline`.

Label conventions follow mmseg: ADE20K and Pascal Context 59 use ``reduce_zero_label`` (raw 0 -> 255, every
other id minus one); Cityscapes reads ``*_gtFine_labelTrainIds.png``, or maps ``*_gtFine_labelIds.png`` to the
19 train ids on the fly; CamVid (the SegNet tutorial's copy) maps its void, 11, to 255. Layout problems are
found when the dataset is built and name the path that was expected; problems inside a file (image/mask size
mismatch, out-of-range ids, unreadable files) are found when the sample is loaded and name the file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml
from PIL import Image
from torch.utils.data import Dataset

from regproxy_cli.classes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    PASCAL_CONTEXT59_CLASSES,
    PASCAL_CONTEXT59_PALETTE,
    PASCAL_CONTEXT_CLASSES,
    PASCAL_CONTEXT_PALETTE,
    default_palette,
)
from regproxy_cli.constants import IGNORE_INDEX, IMAGE_SUFFIXES
from regproxy_cli.errors import RegproxyError, one_line
from regproxy_cli.images import READ_ERRORS, load_image

# Cityscapes labelIds -> trainIds (cityscapesScripts' labels.py); every id not listed is ignored.
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}

# CamVid as the SegNet tutorial publishes it: 11 classes in its label order (mask value 11 is void), with the
# colours of the SegNet tutorial's CamVid palette.
CAMVID_CLASSES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)
CAMVID_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0), (192, 128, 128),
    (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)
CAMVID_VOID = 11


Palette = Sequence[tuple[int, int, int]]
Sample = tuple[Path, Path, str]  # image path, mask path, name


def load_mask(path: Path, palette: Palette | None = None) -> np.ndarray:
    """Read a label mask as an integer HxW array, without EXIF handling (mmseg reads masks unchanged).

    Single-channel masks ('L', 'P' indices, 16-bit) are read as they are. Colour masks are decoded with
    ``palette`` (colour i -> id i) when one is given.

    Raises:
        RegproxyError: if the file cannot be read, or is a colour mask that cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("RGB", "RGBA"):
                array = np.array(img.convert("RGB"))
            elif mode in ("L", "P", "1") or mode.startswith("I"):
                array = np.array(img)
            else:
                raise RegproxyError(f"mask {path} has PIL mode {mode!r}; "
                                    "save masks as single-channel PNGs of class ids")
    except READ_ERRORS as exc:
        raise RegproxyError(f"cannot read mask {path}: {one_line(exc)}") from exc
    if array.ndim == 2:
        return array.astype(np.uint8) if array.dtype == bool else array
    if palette is None:
        raise RegproxyError(f"mask {path} is a colour image; save class ids as a single-channel PNG, "
                            "or give a palette in classes.yaml to decode colours")
    return _decode_colours(array, palette, path)


def _decode_colours(array: np.ndarray, palette: Palette, path: Path) -> np.ndarray:
    """Map each pixel's colour to the index of that colour in ``palette``."""
    codes = (array[..., 0].astype(np.int32) << 16) | (array[..., 1].astype(np.int32) << 8) | array[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in palette], dtype=np.int32)
    order = np.argsort(keys)
    position = np.searchsorted(keys[order], codes).clip(0, len(keys) - 1)
    known = keys[order][position] == codes
    if not known.all():
        y, x = np.argwhere(~known)[0]
        raise RegproxyError(f"mask {path}: colour {tuple(int(c) for c in array[y, x])} at (x={x}, y={y}) "
                            "is not in the palette of classes.yaml")
    return order[position].astype(np.uint8)


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 ("other") becomes 255, every other id moves down by one, 255 stays."""
    label = raw.astype(np.int64) - 1
    label[(raw == 0) | (raw == IGNORE_INDEX)] = IGNORE_INDEX
    return label


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise RegproxyError(f"{what} not found: expected the directory {path}")
    return path


def _pair_by_stem(images: list[Path], mask_dir: Path, mask_suffix: str, what: str) -> list[Sample]:
    """Match every image to ``mask_dir / (stem + mask_suffix)``; a missing mask is an error naming its path."""
    available = {p.name for p in mask_dir.iterdir()}
    samples: list[Sample] = []
    missing: list[Sample] = []
    for image in images:
        mask = mask_dir / f"{image.stem}{mask_suffix}"
        (samples if mask.name in available else missing).append((image, mask, image.stem))
    if missing:
        image, mask, _ = missing[0]
        more = f" ({len(missing) - 1} more images lack masks)" if len(missing) > 1 else ""
        raise RegproxyError(f"{what}: no mask for {image}: expected {mask}{more}")
    return samples


class SegmentationDataset(Dataset):
    """A list of (image, mask, name) samples with the checks and label mapping every format shares.

    Args:
        samples: (image path, mask path, name) triples.
        classes: class names in id order.
        palette: one RGB colour per class, for visualisation.
        transform: optional callable applied to ``(image, label)``.
    """

    label_note = ""  # appended to out-of-range errors when ids were remapped on load

    def __init__(self, samples: list[Sample], classes: Sequence[str], palette: Palette,
                 transform: Callable | None = None) -> None:
        self.samples = samples
        self.classes = tuple(classes)
        self.palette = tuple(tuple(int(c) for c in colour) for colour in palette)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """How many classes the labels use (ids 0..num_classes-1; 255 is ignored)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def map_label(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        """Turn a mask file's raw values into train ids; identity unless a format overrides it."""
        return raw

    def read_mask(self, mask_path: Path) -> np.ndarray:
        """Read a mask file's raw values."""
        return load_mask(mask_path)

    def load_label(self, index: int) -> np.ndarray:
        """The checked uint8 train-id label of sample ``index`` (no image decoding, no transform)."""
        _, mask_path, _ = self.samples[index]
        label = self.map_label(self.read_mask(mask_path), mask_path)
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            value = int(label[bad][0])
            raise RegproxyError(f"mask {mask_path}: label {value} is not a class id 0..{self.num_classes - 1} "
                                f"or {IGNORE_INDEX} (ignore){self.label_note}")
        return label.astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[Any, Any, str]:
        image_path, mask_path, name = self.samples[index]
        image = load_image(image_path)
        label = self.load_label(index)
        if image.shape[:2] != label.shape:
            raise RegproxyError(f"mask {mask_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} "
                                f"is {image.shape[1]}x{image.shape[0]} (width x height)")
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label, name


class ADE20K(SegmentationDataset):
    """ADE20K / SceneParse150: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` with
    ``annotations/{training,validation}/*.png``; 150 classes, raw 0 ignored, other ids shifted down by one.

    Args:
        root: the ``ADEChallengeData2016`` directory or its parent.
        split: ``train``/``training`` or ``val``/``validation``.
        transform: optional callable applied to ``(image, label)``.
    """

    label_note = " (ADE20K ids are shifted down by one on load, raw 0 becoming 255)"
    SPLITS: ClassVar[dict[str, str]] = {
        "train": "training", "training": "training", "val": "validation", "validation": "validation",
    }

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None) -> None:
        root = Path(root)
        if split not in self.SPLITS:
            raise RegproxyError(f"unknown ADE20K split {split!r}; use train or val")
        folder = self.SPLITS[split]
        base = root if (root / "images").is_dir() or root.name == "ADEChallengeData2016" else (
            root / "ADEChallengeData2016")
        image_dir = _require_dir(base / "images" / folder, "ADE20K images")
        mask_dir = _require_dir(base / "annotations" / folder, "ADE20K annotations")
        images = sorted(image_dir.glob("*.jpg"))
        if not images:
            raise RegproxyError(f"ADE20K images not found: no *.jpg files in {image_dir}")
        super().__init__(_pair_by_stem(images, mask_dir, ".png", "ADE20K"), ADE20K_CLASSES, ADE20K_PALETTE,
                         transform)

    def map_label(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        return reduce_zero_label(raw)


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
    ``gtFine/{split}/{city}/*_gtFine_labelTrainIds.png`` (from cityscapesScripts' ``createTrainIdLabelImgs``),
    or, where that file is absent, ``*_gtFine_labelIds.png`` mapped to the 19 train ids on load.

    Args:
        root: the directory holding ``leftImg8bit`` and ``gtFine``.
        split: ``train``, ``val`` or ``test``.
        transform: optional callable applied to ``(image, label)``.
    """

    IMAGE_SUFFIX = "_leftImg8bit.png"
    TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
    LABEL_ID_SUFFIX = "_gtFine_labelIds.png"

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None) -> None:
        root = Path(root)
        image_dir = _require_dir(root / "leftImg8bit" / split, "Cityscapes images")
        mask_dir = _require_dir(root / "gtFine" / split, "Cityscapes annotations")
        images = sorted(image_dir.glob(f"*/*{self.IMAGE_SUFFIX}"))
        if not images:
            raise RegproxyError(f"Cityscapes images not found: no {{city}}/*{self.IMAGE_SUFFIX} files in {image_dir}")
        samples: list[Sample] = []
        for image in images:
            name = image.name[: -len(self.IMAGE_SUFFIX)]
            city_dir = mask_dir / image.parent.name
            mask = city_dir / f"{name}{self.TRAIN_ID_SUFFIX}"
            if not mask.is_file():
                mask = city_dir / f"{name}{self.LABEL_ID_SUFFIX}"
            if not mask.is_file():
                raise RegproxyError(f"Cityscapes: no annotation for {image}: expected "
                                    f"{city_dir / (name + self.TRAIN_ID_SUFFIX)} or {mask}")
            samples.append((image, mask, name))
        super().__init__(samples, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, transform)
        self._lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
            self._lut[label_id] = train_id

    def map_label(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        if mask_path.name.endswith(self.LABEL_ID_SUFFIX):
            # Every labelId that is not a train class (0-6, 9, 10, 14-16, 18, 29, 30, license plate) is ignored.
            return self._lut[np.clip(raw, 0, 255).astype(np.uint8)]
        return raw


class PascalContext(SegmentationDataset):
    """Pascal Context in mmseg's layout: ``VOCdevkit/VOC2010/JPEGImages/*.jpg``,
    ``SegmentationClassContext/*.png`` (from mmseg's ``pascal_context.py`` converter) and
    ``ImageSets/SegmentationContext/{train,val}.txt``.

    With 60 classes id 0 is "background", a class; with 59 it is ignored and the other ids shift down by one
    (mmseg's ``PascalContextDataset59``, ``reduce_zero_label``).

    Args:
        root: the directory holding ``VOCdevkit`` (or the ``VOCdevkit`` or ``VOC2010`` directory itself).
        split: ``train`` or ``val`` (any ``ImageSets/SegmentationContext/{split}.txt``).
        num_classes: 60 or 59.
        transform: optional callable applied to ``(image, label)``.
    """

    def __init__(self, root: str | Path, split: str = "train", num_classes: int = 60,
                 transform: Callable | None = None) -> None:
        if num_classes not in (59, 60):
            raise RegproxyError(f"Pascal Context has 60 or 59 classes, not {num_classes}")
        root = Path(root)
        candidates = (root, root / "VOC2010")  # also accept the VOC2010 or VOCdevkit directory itself
        base = next((p for p in candidates if (p / "JPEGImages").is_dir()), root / "VOCdevkit" / "VOC2010")
        image_dir = _require_dir(base / "JPEGImages", "Pascal Context images")
        mask_dir = _require_dir(base / "SegmentationClassContext", "Pascal Context annotations")
        split_file = base / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        if not split_file.is_file():
            raise RegproxyError(f"Pascal Context split not found: expected the file {split_file}")
        names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not names:
            raise RegproxyError(f"Pascal Context split {split_file} lists no images")
        present = {p.name for p in image_dir.iterdir()}
        absent = [name for name in names if f"{name}.jpg" not in present]
        if absent:
            raise RegproxyError(f"Pascal Context: {len(absent)} image(s) listed in {split_file} are missing, "
                                f"e.g. expected {image_dir / (absent[0] + '.jpg')}")
        images = [image_dir / f"{name}.jpg" for name in names]
        self.reduce_zero = num_classes == 59
        classes, palette = ((PASCAL_CONTEXT59_CLASSES, PASCAL_CONTEXT59_PALETTE) if self.reduce_zero
                            else (PASCAL_CONTEXT_CLASSES, PASCAL_CONTEXT_PALETTE))
        if self.reduce_zero:
            self.label_note = " (Pascal Context 59 ids are shifted down by one on load, raw 0 becoming 255)"
        super().__init__(_pair_by_stem(images, mask_dir, ".png", "Pascal Context"), classes, palette, transform)

    def map_label(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        return reduce_zero_label(raw) if self.reduce_zero else raw


class CamVid(SegmentationDataset):
    """CamVid in the SegNet tutorial's layout: ``CamVid/{split}/*.png`` with ``CamVid/{split}annot/*.png``
    (360x480 images; 367 train, 101 val, 233 test); 11 classes, mask value 11 (void) ignored.

    Args:
        root: the ``CamVid`` directory or its parent.
        split: ``train``, ``val`` or ``test``.
        transform: optional callable applied to ``(image, label)``.
    """

    SPLITS = ("train", "val", "test")
    label_note = f" (CamVid's void, {CAMVID_VOID}, becomes 255 on load)"

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None) -> None:
        if split not in self.SPLITS:
            raise RegproxyError(f"unknown CamVid split {split!r}; use {', '.join(self.SPLITS)}")
        base = camvid_base(Path(root))
        image_dir = _require_dir(base / split, "CamVid images")
        mask_dir = _require_dir(base / f"{split}annot", "CamVid annotations")
        images = sorted(image_dir.glob("*.png"))
        if not images:
            raise RegproxyError(f"CamVid images not found: no *.png files in {image_dir}")
        super().__init__(_pair_by_stem(images, mask_dir, ".png", "CamVid"), CAMVID_CLASSES, CAMVID_PALETTE, transform)

    def map_label(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        label = raw.astype(np.int64)
        label[raw == CAMVID_VOID] = IGNORE_INDEX
        return label


def camvid_base(root: Path) -> Path:
    """The folder holding CamVid's ``train``/``trainannot``: ``root`` itself or ``root/CamVid``."""
    return root if (root / "trainannot").is_dir() or root.name == "CamVid" else root / "CamVid"


class FolderDataset(SegmentationDataset):
    """A user dataset: ``classes.yaml``, ``images/{split}/*.{jpg,png,...}`` and ``masks/{split}/{stem}.png``.

    ``classes.yaml`` is either a list of class names, or a mapping with ``classes`` (the list) and optionally
    ``palette`` (one [r, g, b] per class; also used to decode colour masks), ``ignore_index`` (the mask value
    of unlabelled pixels, default 255; it is mapped to 255 on load) and ``reduce_zero_label`` (true when mask
    value 0 means unlabelled and class i is stored as i + 1, as in ADE20K). Masks hold class ids 0..K-1 as a
    single-channel PNG (8- or 16-bit, 'L' or 'P'), or colours from the palette.

    Args:
        root: the dataset directory.
        split: the sub-directory of ``images`` and ``masks`` to read, e.g. ``train`` or ``val``.
        transform: optional callable applied to ``(image, label)``.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None) -> None:
        root = Path(root)
        spec = read_classes_file(root / "classes.yaml")
        self.ignore_value: int = spec["ignore_index"]
        self.reduce_zero: bool = spec["reduce_zero_label"]
        self.decode_palette = spec["palette"]
        image_dir = root / "images" / split
        if not image_dir.is_dir():
            images_root = root / "images"
            found = sorted(p.name for p in images_root.iterdir() if p.is_dir()) if images_root.is_dir() else []
            hint = f" (splits present: {', '.join(found)})" if found else ""
            raise RegproxyError(f"dataset images not found: expected the directory {image_dir}{hint}")
        mask_dir = _require_dir(root / "masks" / split, "dataset masks")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise RegproxyError(f"dataset images not found: no {'/'.join(IMAGE_SUFFIXES)} files in {image_dir}")
        duplicates = [stem for stem, count in Counter(p.stem for p in images).items() if count > 1]
        if duplicates:
            duplicate = duplicates[0]
            raise RegproxyError(f"two images in {image_dir} share the name {duplicate!r}; masks are matched by name")
        palette = spec["palette"] or default_palette(len(spec["classes"]))
        super().__init__(_pair_by_stem(images, mask_dir, ".png", "dataset"), spec["classes"], palette, transform)

    def read_mask(self, mask_path: Path) -> np.ndarray:
        return load_mask(mask_path, self.decode_palette)

    def map_label(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        label = raw.astype(np.int64)
        ignored = raw == self.ignore_value
        if self.reduce_zero:
            label = reduce_zero_label(raw)
        label[ignored] = IGNORE_INDEX
        return label


def read_classes_file(path: Path) -> dict[str, Any]:
    """Parse and check a FolderDataset ``classes.yaml``.

    Returns:
        ``classes`` (list of names), ``palette`` (list of RGB tuples or None), ``ignore_index`` (int) and
        ``reduce_zero_label`` (bool).

    Raises:
        RegproxyError: naming the file, if it is missing or malformed.
    """
    if not path.is_file():
        raise RegproxyError(f"dataset class list not found: expected the file {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RegproxyError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise RegproxyError(f"{path} must be a list of class names, or a mapping with a 'classes' list")
    unknown = sorted(set(data) - {"classes", "palette", "ignore_index", "reduce_zero_label"})
    if unknown:
        raise RegproxyError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}; "
                            "allowed: classes, palette, ignore_index, reduce_zero_label")
    classes = [str(name) for name in data["classes"]]
    if not 1 <= len(classes) <= IGNORE_INDEX:
        raise RegproxyError(f"{path}: expected 1 to {IGNORE_INDEX} classes (id 255 means ignore), got {len(classes)}")
    palette = data.get("palette")
    if palette is not None:
        valid = isinstance(palette, list) and all(
            isinstance(c, (list, tuple)) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette)
        if not valid or len(palette) != len(classes):
            raise RegproxyError(f"{path}: palette must list one [r, g, b] (0-255) per class ({len(classes)})")
        palette = [tuple(c) for c in palette]
        if len(set(palette)) != len(palette):
            raise RegproxyError(f"{path}: palette colours must be distinct")
    ignore_index = data.get("ignore_index", IGNORE_INDEX)
    reduce_zero = data.get("reduce_zero_label", False)
    if not isinstance(reduce_zero, bool):
        raise RegproxyError(f"{path}: reduce_zero_label must be true or false")
    first_id = 1 if reduce_zero else 0
    if not isinstance(ignore_index, int) or first_id <= ignore_index < first_id + len(classes):
        raise RegproxyError(f"{path}: ignore_index must be an integer mask value that is not a class id, "
                            f"got {ignore_index!r}")
    return {"classes": classes, "palette": palette, "ignore_index": ignore_index, "reduce_zero_label": reduce_zero}


DATASETS: dict[str, Callable[..., SegmentationDataset]] = {
    "ade20k": ADE20K,
    "cityscapes": Cityscapes,
    "pascal-context": partial(PascalContext, num_classes=60),
    "pascal-context-59": partial(PascalContext, num_classes=59),
    "camvid": CamVid,
    "folder": FolderDataset,
}


def build_dataset(kind: str, root: str | Path, split: str = "train",
                  transform: Callable | None = None) -> SegmentationDataset:
    """Build a dataset by kind name.

    Args:
        kind: one of ``ade20k``, ``cityscapes``, ``pascal-context``, ``pascal-context-59``, ``camvid``,
            ``folder`` (case and ``_``/``-`` do not matter).
        root: the dataset's root directory (see each class).
        split: which split to read, e.g. ``train``, ``val`` (or CamVid's ``test``).
        transform: optional callable applied to ``(image, label)``.

    Raises:
        RegproxyError: for an unknown kind (listing the valid ones) or a wrong layout.
    """
    key = kind.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise RegproxyError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASETS)}")
    return DATASETS[key](root, split=split, transform=transform)
