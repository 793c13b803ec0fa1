"""The training loss: per-pixel cross-entropy with an ignore label, averaged the way the config asks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from regproxy_cli.constants import IGNORE_INDEX
from regproxy_cli.errors import RegproxyError

MEAN_OVER = ("all", "labelled")


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, mean_over: str = "all", ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Cross-entropy of (B, K, H, W) logits against (B, H, W) labels, in float32.

    Ignored pixels contribute 0 to the sum. ``mean_over`` chooses the denominator:

    - ``"all"``: every pixel of the batch, B x H x W, ignored ones included. This is mmseg 0.17's
      ``CrossEntropyLoss`` (``reduction='none'``, then ``mean()``; ``avg_non_ignore`` came later), so the paper's.
      A batch with many ignored pixels gets a proportionally smaller loss and gradient.
    - ``"labelled"``: only the labelled pixels, like ``F.cross_entropy(..., ignore_index=...)``.

    A batch whose pixels are all ignored gives 0 (and zero gradients) in both, never NaN.
    """
    if mean_over not in MEAN_OVER:
        raise RegproxyError(f"mean_over must be one of {', '.join(MEAN_OVER)}, got {mean_over!r}")
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    if mean_over == "all":
        return per_pixel.mean()
    labelled = (labels != ignore_index).sum().clamp(min=1)  # 0 / 1 = 0 when nothing is labelled
    return per_pixel.sum() / labelled
