"""Per-class pixel counts of a dataset and the class weights suggested from them (``loss.class_weight: auto``).

The weights are median-frequency balancing (Eigen & Fergus 2015, as SegNet used it on CamVid):
``w_c = median(f) / f_c`` with ``f_c = n_c / sum(n)`` the share of class c among all labelled pixels, the median
taken over the classes that occur. A class as frequent as the median class weighs 1, a ten times rarer one 10.
(Eigen & Fergus divide n_c by the pixels of the images where c occurs; with counts alone we use every image,
which only rescales rare classes' frequencies and is what a pixel histogram can tell.) A class with no pixels
gets weight 0: it never occurs in the labels, so its weight never multiplies anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from regproxy_cli.constants import IGNORE_INDEX
from regproxy_cli.data.datasets import SegmentationDataset

CLASS_WEIGHT_FORMULA = ("median-frequency balancing: w_c = median(f) / f_c, f_c = pixels of class c / labelled "
                        "pixels (median over classes present; absent classes get 0)")


def pixel_counts(dataset: SegmentationDataset, progress: bool = False,
                 indices: Sequence[int] | None = None) -> np.ndarray:
    """Labelled pixels per class, int64 (K,), over every mask of ``dataset`` (or those of ``indices``; 255 excluded;
    images not decoded)."""
    k = dataset.num_classes
    counts = np.zeros(k, dtype=np.int64)
    indices = range(len(dataset)) if indices is None else indices
    for index in tqdm(indices, desc="counting pixels", unit="mask", disable=not progress):
        label = dataset.load_label(index)  # checked train ids: every value is < K or 255
        counts += np.bincount(label.ravel(), minlength=IGNORE_INDEX + 1)[:k]
    return counts


def suggested_class_weights(counts: np.ndarray) -> np.ndarray:
    """Median-frequency weights (float64, (K,)) from per-class pixel counts; see :data:`CLASS_WEIGHT_FORMULA`."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.zeros_like(counts)
    present = counts > 0
    if not present.any():
        return weights
    frequency = counts / counts.sum()
    weights[present] = np.median(frequency[present]) / frequency[present]
    return weights
