"""The training loss against a plain re-computation: mmseg 0.17's mean over all pixels, or over labelled ones."""

import math
from pathlib import Path

import pytest
import torch

from regproxy_cli import RegproxyError
from regproxy_cli.engine.config import load_config
from regproxy_cli.engine.losses import segmentation_loss

REPO = Path(__file__).resolve().parents[1]
IGNORE = 255


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 4, 5, 6) logits and labels with about a third of the pixels ignored, unevenly between the images."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, 6, generator=generator) * 3
    labels = torch.randint(0, 4, (2, 5, 6), generator=generator)
    labels[0, :3] = IGNORE  # 18 of image 0's 30 pixels
    labels[1, 4, :2] = IGNORE  # 2 of image 1's
    return logits, labels


def _summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of -log softmax at the true class over the labelled pixels, one pixel at a time; and their count."""
    total, count = logits.new_zeros(()), 0
    batch, _, height, width = logits.shape
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                label = int(labels[b, y, x])
                if label == IGNORE:
                    continue
                scores = logits[b, :, y, x]
                log_norm = torch.log(torch.exp(scores - scores.max()).sum()) + scores.max()
                total = total - (scores[label] - log_norm)
                count += 1
    return total, count


def test_all_divides_by_every_pixel_and_labelled_by_the_labelled_ones():
    logits, labels = _batch()
    total, count = _summed_nll(logits, labels)
    assert count == 60 - 20
    every = segmentation_loss(logits, labels, mean_over="all")
    labelled = segmentation_loss(logits, labels, mean_over="labelled")
    torch.testing.assert_close(every, total / (2 * 5 * 6))
    torch.testing.assert_close(labelled, total / count)
    assert not math.isclose(every.item(), labelled.item(), rel_tol=1e-3)  # the batch tells the two apart
    assert segmentation_loss(logits, labels) == every  # the default is the paper's


def test_all_has_the_gradient_of_the_plain_computation():
    logits, labels = _batch()
    ours = logits.clone().requires_grad_()
    segmentation_loss(ours, labels, mean_over="all").backward()
    plain = logits.clone().requires_grad_()
    total, _ = _summed_nll(plain, labels)
    (total / labels.numel()).backward()
    torch.testing.assert_close(ours.grad, plain.grad)
    assert (ours.grad[0, :, :3] == 0).all() and ours.grad.abs().sum() > 0  # ignored pixels get no gradient


@pytest.mark.parametrize("mean_over", ["all", "labelled"])
def test_a_fully_ignored_batch_gives_zero_not_nan(mean_over):
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    labels = torch.full((2, 5, 6), IGNORE)
    loss = segmentation_loss(logits, labels, mean_over=mean_over)
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


def test_unknown_mean_over_is_an_error():
    logits, labels = _batch()
    with pytest.raises(RegproxyError, match="mean_over"):
        segmentation_loss(logits, labels, mean_over="pixels")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_recipes_average_over_all_pixels(name):
    assert load_config(REPO / "configs" / name).loss.mean_over == "all"


def test_the_config_section_accepts_both_and_rejects_others_in_one_line():
    assert load_config(None, ["loss.mean_over=labelled"]).loss.mean_over == "labelled"
    with pytest.raises(RegproxyError) as caught:
        load_config(None, ["loss.mean_over=bogus"])
    message = str(caught.value)
    assert "\n" not in message and "loss.mean_over" in message and "'bogus' is not one of all, labelled" in message
