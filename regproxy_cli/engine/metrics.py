"""Semantic-segmentation metrics with mmsegmentation 0.17's semantics (``mmseg/core/evaluation/metrics.py``).

Intersection and union are summed over the whole dataset per class before dividing, so the mIoU is not an
average of per-image IoUs. Pixels labelled ``ignore_index`` are left out. A class with zero union (absent from
both the predictions and the ground truth of the whole dataset) has IoU NaN and is left out of the mean; a class
absent from the ground truth but predicted somewhere has IoU 0 and counts. All values are fractions in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from regproxy_cli.engine.distributed import all_reduce_sum


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
        """Sum the matrices of all processes (a no-op without a process group); every process must call it."""
        if self.matrix is None:  # a rank that saw no image still joins the collective
            self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.matrix = all_reduce_sum(self.matrix)

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


# ---------------------------------------------------------------------------------------------------------------
# Boundary F-score
# ---------------------------------------------------------------------------------------------------------------


def _as_long_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    return array.long() if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array)).long()


def boundary_map(labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Boundary pixels of a (B, H, W) label map: valid pixels with a valid 4-neighbour of another label.

    Both pixels of a differing neighbour pair are boundary pixels, so an edge between classes a and b is drawn
    once on each side and every boundary pixel belongs to the class it carries. The image border and the edge
    of an ignored area are not boundaries (what lies beyond them is unknown).
    """
    edge = torch.zeros_like(valid)
    vertical = (labels[:, 1:, :] != labels[:, :-1, :]) & valid[:, 1:, :] & valid[:, :-1, :]
    horizontal = (labels[:, :, 1:] != labels[:, :, :-1]) & valid[:, :, 1:] & valid[:, :, :-1]
    edge[:, 1:, :] |= vertical
    edge[:, :-1, :] |= vertical
    edge[:, :, 1:] |= horizontal
    edge[:, :, :-1] |= horizontal
    return edge


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Square (Chebyshev) dilation of a (B, H, W) bool mask by ``radius`` pixels."""
    if radius == 0:
        return mask
    pooled = torch.nn.functional.max_pool2d(mask[:, None].float(), 2 * radius + 1, stride=1, padding=radius)
    return pooled[:, 0] > 0


class BoundaryFScore:
    """Class-aware boundary F-score (Csurka et al. 2013's BF, the contour measure of DAVIS / Perazzi et al. 2016),
    with counts summed over a whole dataset like :class:`ConfusionMatrix`.

    A pixel is a boundary pixel when a 4-neighbour has another label (:func:`boundary_map`); pixels whose
    ground truth is ``ignore_index`` are left out of both maps. A predicted boundary pixel of class c is
    *matched* when a ground-truth boundary pixel of class c lies within ``tolerance_px`` (Chebyshev distance,
    i.e. a (2t+1)^2 square dilation), and a ground-truth boundary pixel likewise. Matching is by dilation, not the
    one-to-one assignment of the BSDS benchmark, as in the usual semantic-segmentation BF implementations.
    The tolerance is a fixed pixel count, not a fraction of the image diagonal as in DAVIS (0.8% of it), so compare
    scores only at the same image size; 2 px suits images of 128^2 to 512^2.

    Per class: precision P = matched predicted / predicted boundary pixels, recall R = matched ground-truth /
    ground-truth boundary pixels, F = 2PR / (P + R). Empty cases over the whole dataset: no boundary of class c
    in either map -> F NaN (left out of the mean, like an absent class in mIoU); boundary pixels on one side only
    -> F 0. ``BF`` pools the counts of all classes (micro average), ``mBF`` is the NaN-skipping class mean.

    Args:
        num_classes: K, the number of classes.
        tolerance_px: matching distance in pixels (0 = exact position).
        ignore_index: ground-truth value of pixels that are not scored.
    """

    def __init__(self, num_classes: int, tolerance_px: int = 2, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if tolerance_px < 0:
            raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
        self.num_classes = num_classes
        self.tolerance_px = int(tolerance_px)
        self.ignore_index = ignore_index
        # rows: predicted boundary, matched predicted, ground-truth boundary, matched ground truth; per class
        self.counts = torch.zeros(4, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Forget every pixel counted so far."""
        self.counts.zero_()

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Count one label map (H, W) or a batch (B, H, W) of them.

        Raises:
            ValueError: on a shape mismatch, a map that is not 2-D or 3-D, or ids outside [0, K) that are not
                ``ignore_index``.
        """
        pred = _as_long_tensor(pred)
        target = _as_long_tensor(target).to(pred.device)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.dim() == 2:
            pred, target = pred[None], target[None]
        if pred.dim() != 3:
            raise ValueError(f"expected (H, W) or (B, H, W) label maps, got shape {tuple(pred.shape)}")
        k = self.num_classes
        valid = target != self.ignore_index
        if valid.any() and (int(target[valid].min()) < 0 or int(target[valid].max()) >= k):
            raise ValueError(f"target ids must be in [0, {k}) or {self.ignore_index}")
        if valid.any() and (int(pred[valid].min()) < 0 or int(pred[valid].max()) >= k):
            raise ValueError(f"predicted ids must be in [0, {k})")
        pred_edge = boundary_map(pred, valid)
        target_edge = boundary_map(target, valid)
        # Only classes with a boundary somewhere in this batch need a dilation.
        classes = torch.unique(torch.cat([pred[pred_edge], target[target_edge]]))
        counts = torch.zeros(4, k, dtype=torch.int64)
        for c in classes.tolist():
            pred_c = pred_edge & (pred == c)
            target_c = target_edge & (target == c)
            counts[0, c] = int(pred_c.sum())
            counts[1, c] = int((pred_c & _dilate(target_c, self.tolerance_px)).sum())
            counts[2, c] = int(target_c.sum())
            counts[3, c] = int((target_c & _dilate(pred_c, self.tolerance_px)).sum())
        self.counts += counts

    def all_reduce(self) -> None:
        """Sum the counts of all processes (a no-op without a process group); every process must call it."""
        self.counts = all_reduce_sum(self.counts).cpu()

    def compute(self) -> dict[str, float | np.ndarray]:
        """The scores of everything counted so far.

        Returns:
            ``BF``, ``precision`` and ``recall`` over all classes' pooled counts and ``mBF`` (NaN-skipping class
            mean) as floats; per-class ``F``, ``P`` and ``R`` as float64 arrays of length K (NaN where undefined).
        """
        pred, pred_hit, true, true_hit = self.counts.double().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(pred > 0, pred_hit / pred, np.nan)
            recall = np.where(true > 0, true_hit / true, np.nan)
        f = _f_measure(precision, recall, pred, true)
        p_all, r_all = (pred_hit.sum() / pred.sum() if pred.sum() else np.nan,
                        true_hit.sum() / true.sum() if true.sum() else np.nan)
        f_all = _f_measure(np.array([p_all]), np.array([r_all]), np.array([pred.sum()]), np.array([true.sum()]))
        return {"BF": float(f_all[0]), "mBF": _nanmean(f), "precision": float(p_all), "recall": float(r_all),
                "F": f, "P": precision, "R": recall}


def _f_measure(precision: np.ndarray, recall: np.ndarray, pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """F = 2PR / (P + R); 0 when only one side has boundary pixels (or none match), NaN when neither has any."""
    f = np.full(precision.shape, np.nan)
    both = (pred > 0) & (true > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        total = precision + recall
        f[both] = np.where(total[both] > 0, 2 * precision[both] * recall[both] / total[both], 0.0)
    f[(pred > 0) ^ (true > 0)] = 0.0
    return f


def boundary_f_score(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, *, num_classes: int,
                     tolerance_px: int = 2, ignore_index: int = 255) -> float:
    """Boundary F-score (``BF`` of :class:`BoundaryFScore`) of one label map or batch; NaN without boundaries."""
    metric = BoundaryFScore(num_classes, tolerance_px, ignore_index)
    metric.update(pred, target)
    return float(metric.compute()["BF"])
