"""The training losses against plain re-computations: mmseg 0.17's mean over all pixels or over labelled ones, focal,
Dice, Lovasz-softmax and class weights; and their config keys."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_with
from regproxy_cli import RegproxyError
from regproxy_cli.engine.config import load_config
from regproxy_cli.engine.losses import (
    LOSS_KINDS,
    MEAN_OVER,
    LossContext,
    build_loss,
    get_loss,
    list_losses,
    segmentation_loss,
)

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


# ---- focal, Dice, CE + Dice, Lovasz-softmax and class weights, each against an independent computation ----

WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 0.0])  # class 3 weighs nothing


@pytest.mark.parametrize("mean_over", ["all", "labelled"])
@pytest.mark.parametrize("weight", [None, WEIGHTS])
def test_focal_with_gamma_zero_is_cross_entropy(mean_over, weight):
    logits, labels = _batch()
    focal = segmentation_loss(logits, labels, kind="focal", focal_gamma=0.0, mean_over=mean_over, class_weight=weight)
    ce = segmentation_loss(logits, labels, kind="ce", mean_over=mean_over, class_weight=weight)
    torch.testing.assert_close(focal, ce)


def test_focal_against_a_pixel_by_pixel_computation():
    logits, labels = _batch()
    total = logits.new_zeros((), dtype=torch.float64)
    for b, y, x in torch.nonzero(labels != IGNORE).tolist():
        p = torch.softmax(logits[b, :, y, x].double(), 0)[labels[b, y, x]]
        total = total - (1 - p) ** 2 * torch.log(p) * WEIGHTS[labels[b, y, x]]
    weight_sum = WEIGHTS[labels[labels != IGNORE]].sum()
    kwargs = {"kind": "focal", "focal_gamma": 2.0, "class_weight": WEIGHTS}
    torch.testing.assert_close(segmentation_loss(logits, labels, mean_over="all", **kwargs).double(), total / 60)
    torch.testing.assert_close(segmentation_loss(logits, labels, mean_over="labelled", **kwargs).double(),
                               total / weight_sum.double())


def test_class_weights_match_torch_cross_entropy_with_the_right_denominator():
    logits, labels = _batch()
    # labelled: torch divides by the summed weights of the labelled pixels
    torch.testing.assert_close(segmentation_loss(logits, labels, mean_over="labelled", class_weight=WEIGHTS),
                               F.cross_entropy(logits, labels, weight=WEIGHTS, ignore_index=IGNORE))
    # all: mmseg 0.17 divides the weighted sum by every pixel of the batch
    summed = F.cross_entropy(logits, labels, weight=WEIGHTS, ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(segmentation_loss(logits, labels, mean_over="all", class_weight=WEIGHTS),
                               summed / labels.numel())
    uniform = segmentation_loss(logits, labels, mean_over="labelled", class_weight=torch.full((4,), 3.0))
    torch.testing.assert_close(uniform, segmentation_loss(logits, labels, mean_over="labelled"))


def _dice_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Three pixels, two classes: A (label 0) at p = (1/2, 1/2), B (label 1) at p = (1/4, 3/4), C ignored."""
    logits = torch.tensor([[0.0, 0.0, 5.0], [0.0, math.log(3.0), -5.0]]).reshape(1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, IGNORE]]])
    return logits, labels


def test_dice_on_a_hand_computed_case():
    logits, labels = _dice_case()
    # class 0: overlap 1/2, sum p 3/4, one pixel -> 1 - (2 * 0.5 + 1) / (0.75 + 1 + 1) = 1 - 2 / 2.75
    # class 1: overlap 3/4, sum p 5/4, one pixel -> 1 - (2 * 0.75 + 1) / (1.25 + 1 + 1) = 1 - 2.5 / 3.25
    class0, class1 = 1 - 2 / 2.75, 1 - 2.5 / 3.25
    labelled = segmentation_loss(logits, labels, kind="dice", mean_over="labelled")
    assert labelled.item() == pytest.approx((class0 + class1) / 2, rel=1e-6)
    every = segmentation_loss(logits, labels, kind="dice", mean_over="all")
    assert every.item() == pytest.approx((class0 + class1) / 2 * 2 / 3, rel=1e-6)  # 2 of 3 pixels labelled
    weighted = segmentation_loss(logits, labels, kind="dice", mean_over="labelled", class_weight=torch.tensor([1., 3.]))
    assert weighted.item() == pytest.approx((class0 + 3 * class1) / 4, rel=1e-6)
    both = segmentation_loss(logits, labels, kind="ce+dice", mean_over="labelled")
    ce = (-math.log(0.5) - math.log(0.75)) / 2
    assert both.item() == pytest.approx(ce + (class0 + class1) / 2, rel=1e-6)


def _jaccard_loss(mispredicted: set[int], truth: set[int]) -> float:
    """Berman et al.'s set function: |M| / |G u M| (0 for the empty set)."""
    return len(mispredicted) / len(truth | mispredicted) if mispredicted else 0.0


def _lovasz_extension_naive(errors: torch.Tensor, truth: set[int]) -> torch.Tensor:
    """The Lovasz extension as the integral of F over level sets: sum over the distinct error levels
    v_1 > v_2 > ... of (v_j - v_{j+1}) F({i : e_i >= v_j}), with v_{k+1} = 0 (no sorting of pixels involved)."""
    levels = sorted(set(errors.tolist()), reverse=True)
    where = [errors.tolist().index(v) for v in levels]  # a pixel at each level, for a differentiable v_j
    total = errors.new_zeros(())
    for j, level in enumerate(levels):
        above = {i for i, e in enumerate(errors.tolist()) if e >= level}
        below = errors[where[j + 1]] if j + 1 < len(levels) else 0.0
        total = total + (errors[where[j]] - below) * _jaccard_loss(above, truth)
    return total


def _lovasz_naive(logits: torch.Tensor, labels: torch.Tensor, weight=None) -> torch.Tensor:
    probabilities = torch.softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    flat = labels.reshape(-1)
    keep = (flat != IGNORE).nonzero().flatten().tolist()
    losses, weights = [], []
    for c in sorted({int(flat[i]) for i in keep}):
        truth = {n for n, i in enumerate(keep) if int(flat[i]) == c}
        errors = torch.stack([1 - probabilities[i, c] if n in truth else probabilities[i, c]
                              for n, i in enumerate(keep)])
        losses.append(_lovasz_extension_naive(errors, truth))
        weights.append(1.0 if weight is None else float(weight[c]))
    return sum(w * loss for w, loss in zip(weights, losses)) / sum(weights)


def test_the_naive_lovasz_extension_agrees_with_the_set_function_on_vertices():
    truth = {0, 2}
    for mask in ([1, 0, 0, 1], [0, 0, 1, 0], [1, 1, 1, 1]):
        errors = torch.tensor(mask, dtype=torch.float32)
        expected = _jaccard_loss({i for i, e in enumerate(mask) if e}, truth)
        assert _lovasz_extension_naive(errors, truth).item() == pytest.approx(expected)


@pytest.mark.parametrize("weight", [None, torch.tensor([1.0, 0.5, 3.0])])
def test_lovasz_softmax_and_its_gradient_match_the_naive_extension(weight):
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 3, 3, 4, generator=generator) * 2
    labels = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, IGNORE], [1, 1, IGNORE, 2]]])
    ours = logits.clone().requires_grad_()
    loss = segmentation_loss(ours, labels, kind="lovasz", mean_over="labelled", class_weight=weight)
    loss.backward()
    naive_logits = logits.clone().double().requires_grad_()
    naive = _lovasz_naive(naive_logits, labels, weight)
    naive.backward()
    assert loss.item() == pytest.approx(naive.item(), rel=1e-5)
    torch.testing.assert_close(ours.grad, naive_logits.grad.float(), rtol=1e-4, atol=1e-6)
    every = segmentation_loss(logits, labels, kind="lovasz", mean_over="all", class_weight=weight)
    assert every.item() == pytest.approx(naive.item() * 10 / 12, rel=1e-5)  # 10 of 12 pixels labelled


def test_lovasz_only_averages_the_classes_present():
    logits = torch.randn(1, 4, 2, 2)
    labels = torch.tensor([[[0, 0], [2, 2]]])
    loss = segmentation_loss(logits, labels, kind="lovasz", mean_over="labelled")
    assert loss.item() == pytest.approx(_lovasz_naive(logits, labels).item(), rel=1e-5)


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("mean_over", MEAN_OVER)
def test_every_kind_gives_zero_on_a_fully_ignored_batch(kind, mean_over):
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    labels = torch.full((2, 5, 6), IGNORE)
    loss = segmentation_loss(logits, labels, kind=kind, mean_over=mean_over, class_weight=WEIGHTS)
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_every_kind_decreases_along_its_gradient(kind):
    logits, labels = _batch()
    logits.requires_grad_()
    loss = segmentation_loss(logits, labels, kind=kind, class_weight=WEIGHTS)
    loss.backward()
    with torch.no_grad():
        after = segmentation_loss(logits - 0.05 * logits.grad / logits.grad.norm(), labels, kind=kind,
                                  class_weight=WEIGHTS)
    assert torch.isfinite(logits.grad).all() and after < loss


@pytest.mark.parametrize("name", list_losses())
def test_every_installed_loss_trains_its_classifier_and_ignores_void(name):
    """Every loss plugin (built-in, HSSN, ProtoSeg, a third party's) on the model of the classifier it needs: a
    finite positive scalar whose gradient reaches the classifier, and exactly 0 with no gradient on a void batch."""
    model = tiny_model_with(get_loss(name).classifier or "linear").train()
    loss_fn = build_loss(name, LossContext(model=model, iters=10))
    x = torch.randn(2, 3, 32, 48)
    labels = torch.randint(0, 3, (2, 32, 48))
    labels[0, :10] = IGNORE
    loss = loss_fn(model(x, training_output=True), labels, 0)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    grads = [p.grad for p in model.token_classifier.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)
    void = loss_fn(model(x, training_output=True), torch.full_like(labels, IGNORE), 1)
    void.backward()
    assert void.item() == 0.0
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in list_losses() if get_loss(n).classifier])
def test_a_loss_made_for_one_classifier_refuses_another(name):
    with pytest.raises(RegproxyError, match=f"loss.kind {name} needs model.classifier: {get_loss(name).classifier}"):
        build_loss(name, LossContext(model=tiny_model_with("linear")))


@pytest.mark.parametrize("overrides, expected", [
    (["loss.kind=focal", "loss.focal_gamma=1"], ("focal", "none", 1.0)),
    (["loss.kind=ce+dice", "loss.class_weight=auto"], ("ce+dice", "auto", 2.0)),
    (["loss.kind=lovasz", "loss.class_weight=[1, 0.5, 2]"], ("lovasz", [1.0, 0.5, 2.0], 2.0)),
    (["loss.kind=dice", "loss.class_weight=null"], ("dice", "none", 2.0)),
])
def test_loss_settings_validate(overrides, expected):
    loss = load_config(None, overrides).loss
    assert (loss.kind, loss.class_weight, loss.focal_gamma) == expected


@pytest.mark.parametrize("override, message", [
    ("loss.kind=bce", r"config key loss.kind: 'bce' is not one of ce, ce\+dice, dice, focal, .*lovasz"),
    ("loss.class_weight=median", "config key loss.class_weight: 'median' is not none, auto or a list"),
    ("loss.class_weight=[1, x]", r"config key loss.class_weight\[1\]: expected float"),
    ("loss.class_weight=[1, -1]", "config key loss.class_weight: a list needs one weight >= 0 per class"),
    ("loss.focal_gamma=-1", "config key loss.focal_gamma: must be >= 0"),
    ("model.freeze=head", "config key model.freeze: 'head' is not none, backbone or blocks:N"),
    ("model.freeze=blocks:0", "config key model.freeze: 'blocks:0'"),
    ("model.init_from=''", "config key model.init_from: empty"),
    ("loss.weights=auto", "unknown config key loss.weights"),
])
def test_bad_loss_and_finetune_settings_are_one_line_errors(override, message):
    with pytest.raises(RegproxyError, match=message) as caught:
        load_config(None, [override])
    assert "\n" not in str(caught.value)


def test_the_freeze_and_init_from_settings_validate():
    config = load_config(None, ["model.freeze=blocks:3", "model.init_from=runs/demo/best"])
    assert (config.model.freeze, config.model.init_from) == ("blocks:3", "runs/demo/best")
    assert load_config(None, []).model.freeze == "none" and load_config(None, []).loss.kind == "ce"
