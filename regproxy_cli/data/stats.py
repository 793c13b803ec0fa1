"""Know your data (``regproxy data stats``): per-class pixel share and image count, image sizes, the suggested class
weights, and every mask that cannot be used, named.

Masks are read as training reads them (the dataset's own label mapping: ADE20K's shift, CamVid's void, a folder's
``ignore_index``), so the counts are the train ids the loss sees. Images are not decoded: their size comes from
the file header (turned as the EXIF orientation says, as :func:`regproxy_cli.images.load_image` turns them). A
mask that cannot be read, whose size differs from its image's, or that holds a value that is neither a class id nor
255 is listed with its path and left out of the counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from regproxy_cli.constants import IGNORE_INDEX
from regproxy_cli.data.class_weights import suggested_class_weights
from regproxy_cli.data.datasets import SegmentationDataset
from regproxy_cli.data.open import available_splits, open_dataset
from regproxy_cli.errors import RegproxyError, listed, one_line
from regproxy_cli.images import READ_ERRORS

PROBLEM_KINDS = ("unreadable", "off-size", "out-of-range")


@dataclass(frozen=True)
class MaskProblem:
    """A sample the statistics leave out: the file, what is wrong (one of :data:`PROBLEM_KINDS`) and the detail."""

    path: str
    kind: str
    message: str


@dataclass
class SplitStats:
    """The statistics of one split; pixel and image counts cover the samples without problems."""

    split: str
    classes: list[str]
    images: int  # every sample of the split
    pixels: np.ndarray  # (K,) labelled pixels per class
    images_with: np.ndarray  # (K,) images in which each class occurs
    ignored: int  # pixels labelled 255
    counted: int = 0  # samples without problems: the ones the counts cover
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    problems: list[MaskProblem] = field(default_factory=list)

    @property
    def weights(self) -> np.ndarray:
        """The class weights suggested from this split's pixel counts (see :data:`CLASS_WEIGHT_FORMULA`)."""
        return suggested_class_weights(self.pixels)

    @property
    def labelled(self) -> int:
        return int(self.pixels.sum())

    def to_dict(self) -> dict[str, Any]:
        labelled, total = self.labelled, self.labelled + self.ignored
        weights = self.weights
        return {
            "split": self.split,
            "images": self.images,
            "counted_images": self.counted,
            "labelled_pixels": labelled,
            "ignored_pixels": self.ignored,
            "ignored_percent": 100 * self.ignored / total if total else 0.0,
            "sizes": [{"width": w, "height": h, "images": n} for (w, h), n in self.sizes.most_common()],
            "classes": [
                {"id": i, "name": name, "pixels": int(self.pixels[i]),
                 "pixel_percent": 100 * float(self.pixels[i]) / labelled if labelled else 0.0,
                 "images": int(self.images_with[i]), "weight": float(weights[i])}
                for i, name in enumerate(self.classes)
            ],
            "problems": [{"path": p.path, "kind": p.kind, "message": p.message} for p in self.problems],
        }


def dataset_stats(kind: str, root: str | Path, splits: Sequence[str] | None = None, *, progress: bool = False,
                  workers: int = 4) -> list[SplitStats]:
    """Statistics of every split (default: every split with annotations, :func:`available_splits`).

    Args:
        kind: a dataset kind or ``auto``.
        root: the dataset's root folder.
        splits: the splits to read.
        progress: show a progress bar per split.
        workers: threads reading masks (decoding PNGs releases the GIL).
    """
    names = list(splits) if splits else available_splits(kind, root)
    return [split_stats(open_dataset(kind, root, name), name, progress=progress, workers=workers) for name in names]


def split_stats(dataset: SegmentationDataset, split: str, *, progress: bool = False, workers: int = 4) -> SplitStats:
    """Pixel and image counts per class, image sizes and the problem masks of one dataset split."""
    if workers < 1:
        raise RegproxyError(f"workers must be at least 1, got {workers}")
    k = dataset.num_classes
    stats = SplitStats(split, list(dataset.classes), len(dataset), np.zeros(k, dtype=np.int64),
                       np.zeros(k, dtype=np.int64), 0)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda index: _inspect(dataset, index), range(len(dataset)))
        for counts, size, problems in tqdm(results, total=len(dataset), desc=f"reading {split}", unit="mask",
                                           disable=not progress, leave=False):
            if size is not None:
                stats.sizes[size] += 1
            if problems:
                stats.problems += problems
                continue
            stats.pixels += counts[:k]
            stats.images_with += counts[:k] > 0
            stats.ignored += int(counts[IGNORE_INDEX])
            stats.counted += 1
    return stats


def _inspect(dataset: SegmentationDataset, index: int) -> tuple[np.ndarray | None, tuple[int, int] | None,
                                                                 list[MaskProblem]]:
    """(histogram of the 256 label values, (width, height) of the image, problems) of one sample."""
    image_path, mask_path, _ = dataset.samples[index]
    problems = []
    size = None
    try:
        with Image.open(image_path) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # load_image turns these by 90 degrees
                width, height = height, width
            size = (width, height)
    except READ_ERRORS as error:
        problems.append(MaskProblem(str(image_path), "unreadable", f"cannot read the image ({one_line(error)})"))
    try:
        label = dataset.map_label(dataset.read_mask(mask_path), mask_path)
    except RegproxyError as error:
        problems.append(MaskProblem(str(mask_path), "unreadable", str(error)))
        return None, size, problems
    k = dataset.num_classes
    bad = ((label < 0) | (label >= k)) & (label != IGNORE_INDEX)
    if bad.any():
        values = [str(v) for v in np.unique(label[bad]).tolist()]
        problems.append(MaskProblem(str(mask_path), "out-of-range",
                                    f"value(s) {listed(values)} are not class ids 0..{k - 1} or {IGNORE_INDEX} "
                                    f"(ignore){dataset.label_note}"))
    if size is not None and label.shape != (size[1], size[0]):
        problems.append(MaskProblem(str(mask_path), "off-size",
                                    f"the mask is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
                                    f"{size[0]}x{size[1]} (width x height)"))
    if problems:
        return None, size, problems
    return np.bincount(label.astype(np.uint8).ravel(), minlength=IGNORE_INDEX + 1), size, problems
