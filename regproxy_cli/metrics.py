"""Semantic-segmentation metrics with mmsegmentation 0.17's semantics (``mmseg/core/evaluation/metrics.py``).

Intersection and union are summed over the whole dataset per class before dividing, so the mIoU is not an
average of per-image IoUs. Pixels labelled ``ignore_index`` are left out. A class with zero union (absent from
both the predictions and the ground truth of the whole dataset) has IoU NaN and is left out of the mean; a class
absent from the ground truth but predicted somewhere has IoU 0 and counts. All values are fractions in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


class ConfusionMatrix:
    """A (K, K) pixel count matrix, rows = ground-truth class, columns = predicted class.

    Args:
        num_classes: K, the number of classes.
        ignore_index: ground-truth value of pixels that are not scored.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # Created on the first update, on the device of the predictions, so counts never leave the GPU.
        self.matrix: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget every pixel counted so far."""
        self.matrix = None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch.

        Args:
            pred: predicted class ids, any integer shape.
            target: ground-truth ids of the same shape; ``ignore_index`` marks pixels to skip.

        Raises:
            ValueError: on a shape mismatch, or on ids outside [0, K) that are not ``ignore_index``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        k = self.num_classes
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).to(pred.device).long()
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        # An out-of-range id would land in another cell of the flattened matrix; fail loudly instead.
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= k):
            raise ValueError(f"target ids must be in [0, {k}) or {self.ignore_index}")
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= k):
            raise ValueError(f"predicted ids must be in [0, {k})")
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        if self.matrix is None:
            self.matrix = torch.zeros(k, k, dtype=torch.int64, device=counts.device)
        self.matrix += counts.to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrices of all processes (a no-op unless torch.distributed is initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.matrix is None:
            # Every rank must join the collective, even one that saw no batch.
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)
        dist.all_reduce(self.matrix)

    def compute(self) -> dict[str, float | np.ndarray]:
        """The metrics of everything counted so far.

        Returns:
            ``aAcc`` (all-pixel accuracy), ``mIoU`` and ``mAcc`` (NaN-skipping means) as floats, and the
            per-class ``IoU`` and ``Acc`` as float64 arrays of length K (NaN where undefined).
        """
        k = self.num_classes
        mat = np.zeros((k, k), dtype=np.float64) if self.matrix is None else self.matrix.cpu().double().numpy()
        intersection = np.diag(mat)
        area_label = mat.sum(axis=1)
        area_pred = mat.sum(axis=0)
        union = area_label + area_pred - intersection
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, intersection / union, np.nan)
            acc = np.where(area_label > 0, intersection / area_label, np.nan)
        total = area_label.sum()
        return {
            "aAcc": float(intersection.sum() / total) if total > 0 else float("nan"),
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "IoU": iou,
            "Acc": acc,
        }


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without numpy's empty-slice warning) when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
