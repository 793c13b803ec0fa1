"""ConfusionMatrix against a hand-computed case and an independent per-class set computation (mmseg semantics)."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from regproxy_cli.metrics import ConfusionMatrix


def test_hand_computed_2x2() -> None:
    # Pixels: (gt 0, pred 0), (gt 1, pred 1), (gt 0, pred 1), and one ignored pixel; class 2 never appears.
    metric = ConfusionMatrix(num_classes=3)
    metric.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 255]]))
    result = metric.compute()
    # class 0: intersection 1, union 2, label area 2; class 1: intersection 1, union 2, label area 1.
    np.testing.assert_allclose(result["IoU"][:2], [0.5, 0.5])
    np.testing.assert_allclose(result["Acc"][:2], [0.5, 1.0])
    assert math.isnan(result["IoU"][2]) and math.isnan(result["Acc"][2])
    assert result["mIoU"] == pytest.approx(0.5)
    assert result["mAcc"] == pytest.approx(0.75)
    assert result["aAcc"] == pytest.approx(2 / 3)


def _reference(preds: list[np.ndarray], targets: list[np.ndarray], k: int, ignore: int) -> dict:
    """Per-class set operations summed over images, written independently of the bincount."""
    inter, union, label_area = np.zeros(k), np.zeros(k), np.zeros(k)
    for pred, target in zip(preds, targets):
        valid = target != ignore
        for c in range(k):
            p, t = (pred == c) & valid, (target == c) & valid
            inter[c] += np.logical_and(p, t).sum()
            union[c] += np.logical_or(p, t).sum()
            label_area[c] += t.sum()
    iou = [inter[c] / union[c] if union[c] else math.nan for c in range(k)]
    acc = [inter[c] / label_area[c] if label_area[c] else math.nan for c in range(k)]
    return {"IoU": np.array(iou), "Acc": np.array(acc), "aAcc": inter.sum() / label_area.sum(),
            "mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc)}


def test_matches_independent_computation_on_random_data() -> None:
    k, ignore = 6, 255
    rng = np.random.default_rng(0)
    preds, targets = [], []
    for _ in range(4):
        target = rng.integers(0, 4, size=(9, 13))  # classes 4 and 5 never in the ground truth
        target[rng.random(target.shape) < 0.2] = ignore
        pred = np.where(rng.random(target.shape) < 0.6, np.clip(target, 0, 3), rng.integers(0, 5, target.shape))
        preds.append(pred)  # class 4 is predicted but absent from the ground truth; class 5 absent from both
        targets.append(target)
    metric = ConfusionMatrix(k, ignore_index=ignore)
    for pred, target in zip(preds, targets):
        metric.update(torch.from_numpy(pred), torch.from_numpy(target).to(torch.uint8))
    result, expected = metric.compute(), _reference(preds, targets, k, ignore)
    np.testing.assert_allclose(result["IoU"], expected["IoU"], equal_nan=True)
    np.testing.assert_allclose(result["Acc"], expected["Acc"], equal_nan=True)
    for key in ("aAcc", "mIoU", "mAcc"):
        assert result[key] == pytest.approx(expected[key])
    assert result["IoU"][4] == 0  # predicted but never true: counts as 0 in the mean
    assert math.isnan(result["IoU"][5]) and math.isnan(result["Acc"][4])


def test_counts_sum_over_updates_not_per_image_means() -> None:
    metric = ConfusionMatrix(2)
    metric.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))  # image IoU(0) = 3/4
    metric.update(torch.tensor([1]), torch.tensor([0]))  # image IoU(0) = 0
    assert metric.compute()["IoU"][0] == pytest.approx(3 / 5)  # dataset-level, not (3/4 + 0) / 2


def test_empty_and_reset() -> None:
    metric = ConfusionMatrix(3)
    assert math.isnan(metric.compute()["mIoU"])
    metric.update(torch.zeros(4, dtype=torch.long), torch.full((4,), 255))  # all ignored
    assert math.isnan(metric.compute()["aAcc"])
    metric.update(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert metric.compute()["mIoU"] == 1.0
    metric.reset()
    assert metric.matrix is None


def test_invalid_inputs() -> None:
    metric = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target ids"):
        metric.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="predicted ids"):
        metric.update(torch.tensor([0, 3]), torch.tensor([0, 1]))


def test_all_reduce_single_process_group(tmp_path) -> None:
    metric = ConfusionMatrix(2)
    metric.all_reduce()  # no process group: a no-op
    assert metric.matrix is None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        metric.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        metric.all_reduce()
        assert metric.matrix.tolist() == [[1, 1], [0, 1]]
        empty = ConfusionMatrix(2)
        empty.all_reduce()  # a rank without batches still joins and gets zeros
        assert empty.matrix.tolist() == [[0, 0], [0, 0]]
    finally:
        dist.destroy_process_group()
