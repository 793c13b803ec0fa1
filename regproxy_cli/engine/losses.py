"""Training losses: cross-entropy (the paper's), focal, Dice, CE + Dice and Lovasz-softmax, with an ignore label,
optional class weights, and the mmseg 0.17 normalisation (``loss.mean_over``) on top of each.

Losses are plugins, like backbones and classifiers: any installed distribution may expose a :class:`LossSpec`
under the ``regproxy.losses`` entry-point group, and ``loss.kind`` names it. The built-ins here register through
this package's ``pyproject.toml``; HSSN's hierarchy loss and ProtoSeg's prototype losses live with their
classifiers (:mod:`regproxy_cli.plugins.hssn`, :mod:`regproxy_cli.plugins.protoseg`). A loss reads the model's
:class:`~regproxy_cli.model.regproxy.TrainingOutput` and the labels.

``mean_over`` is the same idea for every kind: ``"labelled"`` is the loss over the labelled pixels, and ``"all"``
scales it by the labelled share of the batch, so a batch with many ignored pixels pulls less (that is what
mmseg 0.17's CrossEntropyLoss did: a per-pixel mean over every pixel, ignored ones counting 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from regproxy_cli.constants import IGNORE_INDEX
from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.plugins import discover, load_plugin

LOSS_GROUP = "regproxy.losses"

MEAN_OVER = ("all", "labelled")
LOSS_KINDS = ("ce", "focal", "dice", "ce+dice", "lovasz")  # the built-in pixel losses


@dataclass
class LossContext:
    """What a loss is built from: the model it trains (unwrapped) and the config's ``loss`` section.

    Attributes:
        model: the model (its ``config`` says the classifier and classes; a loss may read the classifier).
        mean_over, class_weight, focal_gamma: the ``loss`` section (class weights resolved, on the device).
        options: ``loss.options`` as the spec's ``resolve_options`` returned them.
        iters: the run's total iterations (for terms whose weight follows the schedule).
    """

    model: nn.Module
    mean_over: str = "all"
    class_weight: torch.Tensor | None = None
    focal_gamma: float = 2.0
    options: dict = field(default_factory=dict)
    iters: int = 1
    ignore_index: int = IGNORE_INDEX


class Loss(Protocol):
    def __call__(self, output, labels: torch.Tensor, iteration: int) -> torch.Tensor:
        """The scalar loss of a :class:`~regproxy_cli.model.regproxy.TrainingOutput` against (B, H, W) labels."""


def _no_options(options: dict) -> dict:
    if options:
        raise RegproxyError(f"this loss takes no loss.options, got {', '.join(sorted(options))}")
    return {}


@dataclass(frozen=True)
class LossSpec:
    """A loss's declaration.

    Attributes:
        name: what ``loss.kind`` says.
        title: a line for listings.
        factory: ``factory(context)`` returns the :class:`Loss`.
        resolve_options: validates ``loss.options`` (a one-line :class:`RegproxyError` otherwise) and fills defaults.
        classifier: the classifier the loss needs (``model.classifier``), or None for any.
    """

    name: str
    title: str
    factory: Callable[[LossContext], Loss] = field(repr=False, compare=False)
    resolve_options: Callable[[dict], dict] = field(default=_no_options, repr=False, compare=False)
    classifier: str | None = None


class PixelLoss:
    """A built-in kind on the model's class scores at the input size (``output.logits``)."""

    def __init__(self, kind: str, context: LossContext) -> None:
        self.kind, self.context = kind, context

    def __call__(self, output, labels: torch.Tensor, iteration: int) -> torch.Tensor:
        c = self.context
        return segmentation_loss(output.logits, labels, kind=self.kind, mean_over=c.mean_over,
                                 class_weight=c.class_weight, focal_gamma=c.focal_gamma, ignore_index=c.ignore_index)


def _pixel_loss(kind: str, title: str) -> LossSpec:
    return LossSpec(name=kind, title=title, factory=lambda context: PixelLoss(kind, context))


CE = _pixel_loss("ce", "cross-entropy (the paper's)")
FOCAL = _pixel_loss("focal", "focal loss, -(1 - p)^gamma log p (loss.focal_gamma)")
DICE = _pixel_loss("dice", "soft Dice over the batch, averaged over classes")
CE_DICE = _pixel_loss("ce+dice", "cross-entropy + soft Dice")
LOVASZ = _pixel_loss("lovasz", "Lovasz-softmax (the Jaccard index's convex surrogate)")


def list_losses() -> list[str]:
    """Names of all installed losses, sorted."""
    return sorted(discover(LOSS_GROUP, "loss"))


def get_loss(name: str | LossSpec) -> LossSpec:
    """Look up an installed loss by name (a spec passes through unchanged)."""
    if isinstance(name, LossSpec):
        return name
    return load_plugin(LOSS_GROUP, "loss", name, LossSpec, "none (reinstall regproxy)")


def build_loss(name: str, context: LossContext) -> Loss:
    """The ``loss.kind`` loss for ``context.model``; refuses a loss made for another classifier."""
    spec = get_loss(name)
    classifier = getattr(context.model.config, "classifier", "linear")
    if spec.classifier is not None and spec.classifier != classifier:
        raise RegproxyError(f"loss.kind {spec.name} needs model.classifier: {spec.classifier} (this model has "
                            f"{classifier})")
    context.options = spec.resolve_options(dict(context.options))
    return spec.factory(context)
DICE_SMOOTH = 1.0  # added to numerator and denominator: a class absent from labels and predictions scores 0


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, kind: str = "ce", mean_over: str = "all",
    class_weight: torch.Tensor | None = None, focal_gamma: float = 2.0, ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The ``kind`` loss of (B, K, H, W) logits against (B, H, W) labels, in float32.

    - ``ce``: per-pixel cross-entropy. ``mean_over="all"`` divides the sum by every pixel of the batch, B x H x W,
      ignored ones included: mmseg 0.17's ``CrossEntropyLoss`` (``reduction='none'``, then ``mean()``;
      ``avg_non_ignore`` came later), so the paper's. ``"labelled"`` divides by the labelled pixels, like
      ``F.cross_entropy(..., ignore_index=...)``. With ``class_weight`` each pixel's loss is multiplied by its
      class's weight; ``"all"`` still divides by B x H x W (mmseg 0.17 with ``class_weight``), ``"labelled"``
      by the summed weights of the labelled pixels (``F.cross_entropy(weight=...)``).
    - ``focal``: ``-(1 - p_t)^gamma log p_t`` per pixel (Lin et al. 2017), class weights as alpha, normalised as
      ``ce``; gamma = 0 is ``ce``.
    - ``dice``: 1 - soft Dice per class over the batch's labelled pixels, ``(2 sum p g + 1) / (sum p + sum g + 1)``
      on softmax probabilities, averaged over all K classes (weighted mean with ``class_weight``).
    - ``ce+dice``: the sum of the two.
    - ``lovasz``: Lovasz-softmax (Berman et al. 2018), the Lovasz extension of each class's Jaccard loss on the
      batch's labelled pixels, averaged over the classes present in the labels (weighted mean with weights).

    Dice and Lovasz are not per-pixel sums: ``"labelled"`` is the loss itself, ``"all"`` multiplies it by the
    labelled share of the batch. A batch whose pixels are all ignored gives 0 (and zero gradients), never NaN.
    """
    if mean_over not in MEAN_OVER:
        raise RegproxyError(f"mean_over must be one of {', '.join(MEAN_OVER)}, got {mean_over!r}")
    if kind not in LOSS_KINDS:
        raise RegproxyError(f"loss kind must be one of {', '.join(LOSS_KINDS)}, got {kind!r}")
    logits = logits.float()
    if class_weight is not None:
        class_weight = class_weight.to(device=logits.device, dtype=torch.float32)
        if class_weight.shape != (logits.shape[1],):
            raise RegproxyError(f"class weights: {tuple(class_weight.shape)} for {logits.shape[1]} classes")
    if kind == "ce":
        return _cross_entropy(logits, labels, mean_over, class_weight, ignore_index)
    if kind == "focal":
        return _focal(logits, labels, mean_over, class_weight, focal_gamma, ignore_index)
    if kind == "dice":
        return _dice(logits, labels, mean_over, class_weight, ignore_index)
    if kind == "ce+dice":
        return (_cross_entropy(logits, labels, mean_over, class_weight, ignore_index)
                + _dice(logits, labels, mean_over, class_weight, ignore_index))
    return _lovasz_softmax(logits, labels, mean_over, class_weight, ignore_index)


def _pixel_mean(per_pixel: torch.Tensor, labels: torch.Tensor, mean_over: str, class_weight: torch.Tensor | None,
                ignore_index: int) -> torch.Tensor:
    """Sum a per-pixel loss (0 at ignored pixels) with class weights, divided as ``mean_over`` says."""
    labelled = labels != ignore_index
    if class_weight is None:
        if mean_over == "all":
            return per_pixel.mean()
        return per_pixel.sum() / labelled.sum().clamp(min=1)  # 0 / 1 = 0 when nothing is labelled
    pixel_weight = class_weight[torch.where(labelled, labels, 0)] * labelled
    total = (per_pixel * pixel_weight).sum()
    if mean_over == "all":
        return total / labels.numel()
    # tiny, not 1: weights may sum to less than 1; when they sum to 0 the total is 0 too
    return total / pixel_weight.sum().clamp(min=torch.finfo(torch.float32).tiny)


def _cross_entropy(logits, labels, mean_over, class_weight, ignore_index) -> torch.Tensor:
    per_pixel = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    return _pixel_mean(per_pixel, labels, mean_over, class_weight, ignore_index)


def _focal(logits, labels, mean_over, class_weight, gamma, ignore_index) -> torch.Tensor:
    if gamma < 0:
        raise RegproxyError(f"focal gamma must be >= 0, got {gamma}")
    labelled = labels != ignore_index
    log_p = F.log_softmax(logits, dim=1).gather(1, torch.where(labelled, labels, 0).unsqueeze(1)).squeeze(1)
    per_pixel = -((1 - log_p.exp()) ** gamma) * log_p * labelled
    return _pixel_mean(per_pixel, labels, mean_over, class_weight, ignore_index)


def _labelled_share(labels: torch.Tensor, mean_over: str, ignore_index: int) -> torch.Tensor | float:
    return (labels != ignore_index).float().mean() if mean_over == "all" else 1.0


def _probabilities_and_targets(logits, labels, ignore_index) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and one-hot targets of the labelled pixels only, both (N, K)."""
    classes = logits.shape[1]
    probabilities = F.softmax(logits, dim=1).permute(0, 2, 3, 1).reshape(-1, classes)
    flat = labels.reshape(-1)
    labelled = flat != ignore_index
    probabilities, flat = probabilities[labelled], flat[labelled]
    return probabilities, F.one_hot(flat, classes).to(probabilities.dtype)


def _dice(logits, labels, mean_over, class_weight, ignore_index) -> torch.Tensor:
    probabilities, targets = _probabilities_and_targets(logits, labels, ignore_index)
    overlap = (probabilities * targets).sum(0)
    size = probabilities.sum(0) + targets.sum(0)
    per_class = 1 - (2 * overlap + DICE_SMOOTH) / (size + DICE_SMOOTH)
    if class_weight is None:
        loss = per_class.mean()
    else:
        loss = (per_class * class_weight).sum() / class_weight.sum().clamp(min=torch.finfo(torch.float32).tiny)
    return loss * _labelled_share(labels, mean_over, ignore_index)


def lovasz_jaccard_increments(sorted_truth: torch.Tensor) -> torch.Tensor:
    """The increments F(S_i) - F(S_{i-1}) of the Jaccard loss along an ordering of the pixels.

    ``sorted_truth`` (N,) is 1 where the pixel belongs to the class (the set G), in the order of decreasing error.
    S_i is the first i pixels, taken as mispredicted; the Jaccard loss of a mispredicted set S is
    ``|S| / |G u S|`` (Berman et al., Eq. 3), and ``|G u S_i| = |G| + i - |G n S_i|``.
    """
    i = torch.arange(1, sorted_truth.numel() + 1, device=sorted_truth.device, dtype=torch.float32)
    union = sorted_truth.sum() + i - sorted_truth.cumsum(0)
    loss_of_prefix = i / union
    return torch.diff(loss_of_prefix, prepend=loss_of_prefix.new_zeros(1))


def _lovasz_softmax(logits, labels, mean_over, class_weight, ignore_index) -> torch.Tensor:
    probabilities, targets = _probabilities_and_targets(logits, labels, ignore_index)
    present = (targets.sum(0) > 0).nonzero().flatten()
    if present.numel() == 0:  # nothing labelled
        return logits.sum() * 0.0
    losses = []
    for c in present.tolist():
        errors = (targets[:, c] - probabilities[:, c]).abs()  # 1 - p on the class's pixels, p elsewhere
        errors, order = torch.sort(errors, descending=True)
        # the Lovasz extension is linear between sort orders: its gradient flows through the sorted errors
        losses.append(torch.dot(errors, lovasz_jaccard_increments(targets[order, c])))
    losses = torch.stack(losses)
    if class_weight is None:
        loss = losses.mean()
    else:
        weights = class_weight[present]
        loss = (losses * weights).sum() / weights.sum().clamp(min=torch.finfo(torch.float32).tiny)
    return loss * _labelled_share(labels, mean_over, ignore_index)


def token_label_histogram(output, labels: torch.Tensor, num_classes: int,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, K, H, W): how many labelled pixels of each class each token's region holds.

    RegProxy's region of a token is soft: a pixel counts towards each of its 3x3 neighbouring tokens by its
    affinity (the transpose of painting). The linear baseline's region is the token's own stride x stride patch.
    Labels are (B, H_in, W_in) at the input size; the padding to the token grid counts as unlabelled.
    """
    batch, _, grid_h, grid_w = output.token_outputs.shape
    sub_h, sub_w = output.region_res
    cell_h, cell_w = output.stride // sub_h, output.stride // sub_w
    height, width = labels.shape[-2:]
    padded = F.pad(labels, (0, grid_w * output.stride - width, 0, grid_h * output.stride - height),
                   value=ignore_index)
    rows, cols = grid_h * sub_h, grid_w * sub_w
    cell = (torch.arange(padded.shape[1], device=labels.device) // cell_h)[:, None] * cols + (
        torch.arange(padded.shape[2], device=labels.device) // cell_w)[None, :]
    labelled = padded != ignore_index
    key = ((torch.arange(batch, device=labels.device)[:, None, None] * num_classes + torch.where(labelled, padded, 0))
           * (rows * cols) + cell)[labelled]
    cells = torch.bincount(key, minlength=batch * num_classes * rows * cols).reshape(batch, num_classes, rows, cols)
    cells = cells.float()
    if output.affinity is None:
        return cells
    return unpaint(cells, output.affinity.detach().float())


def unpaint(pixels: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`~regproxy_cli.model.ops.paint`: (B, K, H*h, W*w) pixel values -> (B, K, H, W)
    token sums, each pixel's value shared among its 3x3 neighbouring tokens by its affinities."""
    batch, classes = pixels.shape[:2]
    _, _, sub_h, sub_w, height, width = affinity.shape
    cells = pixels.reshape(batch, classes, height, sub_h, width, sub_w)
    out = pixels.new_zeros(batch, classes, height + 2, width + 2)
    for n in range(9):
        dy, dx = divmod(n, 3)  # neighbour (dy - 1, dx - 1) of the pixel's own token
        share = torch.einsum("bijyx,bkyixj->bkyx", affinity[:, n], cells)
        out[:, :, dy : dy + height, dx : dx + width] += share
    return out[:, :, 1:-1, 1:-1]


def token_labels(output, labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, H, W) the majority class of each token's region (:func:`token_label_histogram`); ignore_index where the
    region holds no labelled pixel."""
    histogram = token_label_histogram(output, labels, num_classes, ignore_index)
    counts, classes = histogram.max(1)
    return torch.where(counts > 0, classes, torch.full_like(classes, ignore_index))
