"""ConfusionMatrix against a hand-computed case and an independent per-class set computation (mmseg semantics);
the boundary F-score against a naive pixel-loop implementation and its edge cases."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from regproxy_cli.engine.metrics import BoundaryFScore, ConfusionMatrix, boundary_f_score


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
    metric.all_reduce()  # no process group: nothing counted stays nothing
    assert metric.matrix.tolist() == [[0, 0], [0, 0]] and np.isnan(metric.compute()["mIoU"])
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


# --- boundary F-score ---------------------------------------------------------------------------------------------


def _naive_boundary(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Boundary pixels by explicit loops: valid, with a valid 4-neighbour carrying another label."""
    h, w = labels.shape
    edge = np.zeros((h, w), dtype=bool)
    for y in range(h):
        for x in range(w):
            if not valid[y, x]:
                continue
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and valid[ny, nx] and labels[ny, nx] != labels[y, x]:
                    edge[y, x] = True
    return edge


def _naive_matches(source: np.ndarray, other: np.ndarray, tol: int) -> int:
    """Pixels of ``source`` with a pixel of ``other`` within Chebyshev distance ``tol``, by searching the window."""
    h, w = source.shape
    hits = 0
    for y, x in zip(*np.nonzero(source)):
        window = other[max(y - tol, 0):min(y + tol + 1, h), max(x - tol, 0):min(x + tol + 1, w)]
        hits += bool(window.any())
    return hits


def _naive_bf(preds: list[np.ndarray], targets: list[np.ndarray], k: int, tol: int, ignore: int = 255) -> dict:
    counts = np.zeros((4, k))
    for pred, target in zip(preds, targets):
        valid = target != ignore
        pe, te = _naive_boundary(pred, valid), _naive_boundary(target, valid)
        for c in range(k):
            pc, tc = pe & (pred == c), te & (target == c)
            counts[:, c] += [pc.sum(), _naive_matches(pc, tc, tol), tc.sum(), _naive_matches(tc, pc, tol)]
    f = []
    for n_pred, hit_pred, n_true, hit_true in counts.T:
        if n_pred == 0 and n_true == 0:
            f.append(math.nan)
        elif n_pred == 0 or n_true == 0 or hit_pred + hit_true == 0:
            f.append(0.0)
        else:
            p, r = hit_pred / n_pred, hit_true / n_true
            f.append(2 * p * r / (p + r))
    p, r = counts[1].sum() / counts[0].sum(), counts[3].sum() / counts[2].sum()
    return {"F": np.array(f), "BF": 2 * p * r / (p + r), "precision": p, "recall": r}


@pytest.mark.parametrize("tol", [0, 1, 2])
def test_boundary_f_matches_naive_loops(tol: int) -> None:
    k, ignore = 5, 255
    rng = np.random.default_rng(tol)
    preds, targets = [], []
    for _ in range(3):
        # Blocky maps (upsampled 3x3-pixel cells) so there are regions and not only noise.
        target = np.kron(rng.integers(0, 4, size=(5, 6)), np.ones((3, 3), dtype=np.int64))
        target[rng.random(target.shape) < 0.05] = ignore
        pred = np.kron(rng.integers(0, 5, size=(5, 6)), np.ones((3, 3), dtype=np.int64))
        pred = np.where(rng.random(target.shape) < 0.6, np.clip(target, 0, 3), pred)
        preds.append(pred)
        targets.append(target)
    metric = BoundaryFScore(k, tolerance_px=tol, ignore_index=ignore)
    for pred, target in zip(preds, targets):
        metric.update(pred, target.astype(np.uint8))
    result, expected = metric.compute(), _naive_bf(preds, targets, k, tol)
    np.testing.assert_allclose(result["F"], expected["F"], equal_nan=True)
    for key in ("BF", "precision", "recall"):
        assert result[key] == pytest.approx(expected[key])
    assert result["mBF"] == pytest.approx(np.nanmean(expected["F"]))
    # A batch update counts the same as one image at a time.
    batched = BoundaryFScore(k, tolerance_px=tol, ignore_index=ignore)
    batched.update(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(targets)))
    assert batched.counts.tolist() == metric.counts.tolist()


def _two_regions(split: int, size: int = 16) -> np.ndarray:
    labels = np.zeros((size, size), dtype=np.int64)
    labels[:, split:] = 1
    return labels


def test_boundary_f_perfect_and_shifted() -> None:
    target = _two_regions(8)
    assert boundary_f_score(target, target, num_classes=2, tolerance_px=0) == 1.0
    # A 2 px shift is within a 2 px tolerance but not within 1 px.
    assert boundary_f_score(_two_regions(10), target, num_classes=2, tolerance_px=2) == 1.0
    assert boundary_f_score(_two_regions(10), target, num_classes=2, tolerance_px=1) < 1.0
    # A straight edge shifted beyond the tolerance matches nowhere; shifting only part of it scores in between.
    scores = [boundary_f_score(_two_regions(8 + shift), target, num_classes=2, tolerance_px=1) for shift in range(4)]
    assert scores == [1.0, 1.0, 0.0, 0.0]
    half = target.copy()
    half[:8] = _two_regions(11)[:8]
    assert 0.0 < boundary_f_score(half, target, num_classes=2, tolerance_px=1) < 1.0


def test_boundary_f_is_class_aware() -> None:
    # The same edge, but the prediction swaps the two classes: no boundary pixel has a same-class match nearby.
    target = _two_regions(8)
    assert boundary_f_score(1 - target, target, num_classes=2, tolerance_px=0) == 0.0


def test_boundary_f_ignore_pixels() -> None:
    target = _two_regions(8)
    pred = target.copy()
    pred[:, 2] = 1  # a wrong thin stripe...
    ignored = target.copy()
    ignored[:, 1:4] = 255  # ...inside an ignored band: not scored, and the band's edges are not boundaries
    assert boundary_f_score(pred, ignored, num_classes=2, tolerance_px=0) == 1.0
    assert boundary_f_score(pred, target, num_classes=2, tolerance_px=0) < 1.0
    metric = BoundaryFScore(2, tolerance_px=0)
    metric.update(pred, ignored)
    assert metric.counts[:, 0].tolist() == [16, 16, 16, 16]  # only the true edge at column 7 / 8 counts


def test_boundary_f_empty_cases() -> None:
    flat = np.zeros((6, 6), dtype=np.int64)
    metric = BoundaryFScore(3)
    result = metric.compute()  # nothing counted: undefined, not 0 or 1
    assert math.isnan(result["BF"]) and math.isnan(result["mBF"])
    assert math.isnan(boundary_f_score(flat, flat, num_classes=3))  # no boundary on either side: undefined
    # Boundaries on one side only score 0 for the classes involved; class 2 (in neither) stays NaN.
    metric.update(flat, _two_regions(3, 6))
    result = metric.compute()
    assert result["BF"] == 0.0 and result["F"][:2].tolist() == [0.0, 0.0] and math.isnan(result["F"][2])
    metric.reset()
    metric.update(_two_regions(3, 6), flat)
    assert metric.compute()["BF"] == 0.0
    assert math.isnan(boundary_f_score(flat, np.full((6, 6), 255), num_classes=3))  # all ignored


def test_boundary_f_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        BoundaryFScore(2, tolerance_px=-1)
    metric = BoundaryFScore(3)
    with pytest.raises(ValueError, match="shape"):
        metric.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="target ids"):
        metric.update(np.zeros((2, 2)), np.full((2, 2), 7))
    with pytest.raises(ValueError, match="predicted ids"):
        metric.update(np.full((2, 2), 3), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="label maps"):
        metric.update(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))
