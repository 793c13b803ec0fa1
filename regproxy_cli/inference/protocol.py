"""The test protocol as mmsegmentation 0.17 runs it for the authors' evaluation: whole-image or sliding-window
logits, keep-ratio test scales, and multi-scale + flip averaging of probabilities.

Everything here is pure torch on an already-normalised float tensor (see ``constants.IMAGENET_MEAN``/``IMAGENET_STD``);
loading, normalising and saving images is :mod:`regproxy_cli.inference.predictor`'s business.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regproxy_cli.data.transforms import rescale_size
from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.resize import check_pair

MODES = ("whole", "slide")


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the sliding windows along one axis, as mmseg's ``slide_inference`` places them.

    ``grids = max(size - window + stride - 1, 0) // stride + 1`` windows start at ``i * stride``; a window that
    would run past the end is moved back so that it ends at the image end (and starts at 0 at the earliest).

    Args:
        size: the image side.
        window: the window side.
        stride: the step between windows.

    Returns:
        The start of every window (possibly repeated when windows are moved back onto the same place).
    """
    grids = max(size - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, size) - window, 0) for i in range(grids)]


@torch.inference_mode()
def slide_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    num_classes: int,
    window: tuple[int, int],
    stride: tuple[int, int],
    batch_size: int = 8,
) -> torch.Tensor:
    """Sliding-window logits with the authors' override of mmseg's ``slide_inference``.

    Windows are placed by :func:`window_starts` on both axes. Each window is zero-padded bottom/right to the full
    window size (the authors' change: the model always sees the crop size it was trained on, so an image smaller
    than the window is one padded window), its logits are cropped back and summed into an accumulator, which is
    finally divided by how many windows covered each pixel. Windows of all images and positions are stacked into
    forward calls of up to ``batch_size``, so peak memory is the accumulator plus one batch of windows.

    Args:
        model: maps a (N, 3, wh, ww) batch to (N, K, wh, ww) logits.
        images: (B, 3, H, W) normalised images.
        num_classes: K, the number of logit channels the model returns.
        window: (wh, ww), the crop size.
        stride: (sh, sw), the step between windows.
        batch_size: windows per forward call.

    Returns:
        (B, K, H, W) logits averaged over the windows covering each pixel.
    """
    win_h, win_w = check_pair("window", window)
    stride_h, stride_w = check_pair("stride", stride)
    if batch_size < 1:
        raise RegproxyError(f"batch size must be at least 1, got {batch_size}")
    batch, _, height, width = images.shape
    # At least float32: summing many half-precision windows would lose precision.
    dtype = torch.promote_types(images.dtype, torch.float32)
    # channels-last, like the models' logits: the window sums then add contiguous K-vectors
    logits_sum = images.new_zeros((batch, height, width, num_classes), dtype=dtype).permute(0, 3, 1, 2)
    count = images.new_zeros((1, 1, height, width), dtype=dtype)  # the same for every image

    boxes = [
        (y1, min(y1 + win_h, height), x1, min(x1 + win_w, width))
        for y1 in window_starts(height, win_h, stride_h)
        for x1 in window_starts(width, win_w, stride_w)
    ]
    for y1, y2, x1, x2 in boxes:
        count[..., y1:y2, x1:x2] += 1
    jobs = [(b, box) for b in range(batch) for box in boxes]

    for first in range(0, len(jobs), batch_size):
        chunk = jobs[first : first + batch_size]
        crops = [
            F.pad(images[b, :, y1:y2, x1:x2], (0, win_w - (x2 - x1), 0, win_h - (y2 - y1)))
            for b, (y1, y2, x1, x2) in chunk
        ]
        out = model(torch.stack(crops))
        for (b, (y1, y2, x1, x2)), logits in zip(chunk, out):
            logits_sum[b, :, y1:y2, x1:x2] += logits[:, : y2 - y1, : x2 - x1]
    return logits_sum.div_(count)


@torch.inference_mode()
def segment_probs(
    model: nn.Module,
    image: torch.Tensor,
    *,
    num_classes: int,
    mode: str = "whole",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    test_scale: tuple[int, int] | None = None,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: tuple[int, int],
    batch_size: int = 8,
) -> torch.Tensor:
    """Class probabilities of one image with mmseg's (multi-scale, flip) ``aug_test``.

    For every ratio r the image is resized bilinearly to ``rescale_size(H, W, test_scale * r)`` (mmseg multiplies
    the scale, truncating to int, and keeps the aspect ratio), run whole or sliding-window (and, with ``flip``,
    also mirrored, its logits mirrored back); each logit map is resized bilinearly to ``out_size`` and softmaxed,
    and the probabilities are averaged over all scales and flips.

    Args:
        model: maps a normalised (N, 3, h, w) batch to (N, K, h, w) logits.
        image: the normalised image, (1, 3, H, W) or (3, H, W).
        num_classes: K.
        mode: ``"whole"`` or ``"slide"``.
        window: the sliding window (wh, ww); required for ``"slide"``.
        stride: the sliding stride (sh, sw); required for ``"slide"``.
        test_scale: (long_max, short_max) as in mmseg's test pipeline; None keeps the input size (times r).
        ratios: scale ratios, e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) for the paper's multi-scale numbers.
        flip: also average the horizontally flipped image.
        out_size: (height, width) of the probabilities, usually the original image's size.
        batch_size: windows per forward call in ``"slide"`` mode.

    Returns:
        (K, out_h, out_w) probabilities, summing to 1 over the classes.
    """
    if mode not in MODES:
        raise RegproxyError(f"inference mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "slide" and (window is None or stride is None):
        raise RegproxyError("sliding-window inference needs a window and a stride")
    if not ratios:
        raise RegproxyError("at least one test scale ratio is needed")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, 3, H, W) or (3, H, W), got {tuple(image.shape)}")
    out_size = check_pair("output size", out_size)
    height, width = image.shape[-2:]

    def run(batch: torch.Tensor) -> torch.Tensor:
        if mode == "slide":
            return slide_logits(model, batch, num_classes=num_classes, window=window, stride=stride,
                                batch_size=batch_size)
        return model(batch)

    probs = image.new_zeros((num_classes, *out_size), dtype=torch.promote_types(image.dtype, torch.float32))
    for ratio in ratios:
        if ratio <= 0:
            raise RegproxyError(f"test scale ratios must be positive, got {ratio}")
        if test_scale is None:
            size = (int(height * ratio + 0.5), int(width * ratio + 0.5))
        else:
            size = rescale_size(height, width, (int(test_scale[0] * ratio), int(test_scale[1] * ratio)))
        size = (max(size[0], 1), max(size[1], 1))
        scaled = image
        if size != (height, width):
            scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        views = [(scaled, False), (scaled.flip(-1), True)] if flip else [(scaled, False)]
        for view, flipped in views:
            logits = run(view)
            if flipped:
                logits = logits.flip(-1)
            logits = F.interpolate(logits.to(probs.dtype), size=out_size, mode="bilinear", align_corners=False)
            probs += logits[0].softmax(dim=0)
    return probs.div_(len(ratios) * (2 if flip else 1))
