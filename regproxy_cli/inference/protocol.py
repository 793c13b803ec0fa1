"""The test protocol as mmsegmentation 0.17 runs it for the authors' evaluation: whole-image or sliding-window
logits, keep-ratio test scales, and multi-scale + flip averaging of probabilities.

Everything here is pure torch on an already-normalised float tensor (see ``constants.IMAGENET_MEAN``/``IMAGENET_STD``);
loading, normalising and saving images is :mod:`regproxy_cli.inference.predictor`'s business.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regproxy_cli.constants import INFERENCE_MODES
from regproxy_cli.data.transforms import rescale_size
from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.resize import check_pair, resize_rows


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


TTA_FULL_SIZE_LIMIT = 1 << 26  # K x H x W floats (256 MB) of output-size probabilities; above, rows in bands


def scale_sizes(
    height: int, width: int, *, test_scale: tuple[float, float] | None, ratios: Sequence[float]
) -> list[tuple[int, int]]:
    """The size an H x W image is resized to for each ratio of mmseg's multi-scale test.

    With a test scale, ``rescale_size(H, W, test_scale * r)`` (mmseg multiplies the scale, truncating to int, and
    keeps the aspect ratio); without one, the image size times r, rounded half up. Never below 1 x 1.
    """
    if not ratios:
        raise RegproxyError("at least one test scale ratio is needed")
    sizes = []
    for ratio in ratios:
        if ratio <= 0:
            raise RegproxyError(f"test scale ratios must be positive, got {ratio}")
        if test_scale is None:
            size = (int(height * ratio + 0.5), int(width * ratio + 0.5))
        else:
            size = rescale_size(height, width, (int(test_scale[0] * ratio), int(test_scale[1] * ratio)))
        sizes.append((max(size[0], 1), max(size[1], 1)))
    return sizes


def augmented_logits(
    model: nn.Module,
    image: torch.Tensor,
    *,
    num_classes: int,
    mode: str,
    window: tuple[int, int] | None,
    stride: tuple[int, int] | None,
    sizes: list[tuple[int, int]],
    flip: bool,
    batch_size: int,
) -> Iterator[torch.Tensor]:
    """(1, K, h, w) logits of each scale (and mirrored view, mirrored back) at its own size, in aug_test's order.

    A generator: each view is computed when it is asked for, so a caller can use and drop one before the next.
    """
    if mode not in INFERENCE_MODES:
        raise RegproxyError(f"inference mode must be one of {', '.join(INFERENCE_MODES)}, got {mode!r}")
    if mode == "slide" and (window is None or stride is None):
        raise RegproxyError("sliding-window inference needs a window and a stride")
    for size in sizes:
        scaled = image
        if size != tuple(image.shape[-2:]):
            scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            view = scaled.flip(-1) if flipped else scaled
            if mode == "slide":
                logits = slide_logits(model, view, num_classes=num_classes, window=window, stride=stride,
                                      batch_size=batch_size)
            else:
                logits = model(view)
            yield logits.flip(-1) if flipped else logits


def _one_image(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, 3, H, W) or (3, H, W), got {tuple(image.shape)}")
    return image


@torch.inference_mode()
def segment_probs(
    model: nn.Module,
    image: torch.Tensor,
    *,
    num_classes: int,
    mode: str = "whole",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    test_scale: tuple[float, float] | None = None,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: tuple[int, int],
    batch_size: int = 8,
) -> torch.Tensor:
    """Class probabilities of one image with mmseg's (multi-scale, flip) ``aug_test``.

    For every ratio r the image is resized bilinearly to its :func:`scale_sizes` size, run whole or sliding-window
    (and, with ``flip``, also mirrored, its logits mirrored back); each logit map is resized bilinearly to
    ``out_size`` and softmaxed, and the probabilities are averaged over all scales and flips.

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
        out_size: (height, width) of the probabilities: mmseg's is the original image's size.
        batch_size: windows per forward call in ``"slide"`` mode.

    Returns:
        (K, out_h, out_w) probabilities, summing to 1 over the classes.
    """
    image = _one_image(image)
    out_size = check_pair("output size", out_size)
    sizes = scale_sizes(*image.shape[-2:], test_scale=test_scale, ratios=ratios)
    probs = image.new_zeros((num_classes, *out_size), dtype=torch.promote_types(image.dtype, torch.float32))
    for logits in augmented_logits(model, image, num_classes=num_classes, mode=mode, window=window, stride=stride,
                                    sizes=sizes, flip=flip, batch_size=batch_size):
        logits = F.interpolate(logits.to(probs.dtype), size=out_size, mode="bilinear", align_corners=False)
        probs += logits[0].softmax(dim=0)
    return probs.div_(len(sizes) * (2 if flip else 1))


@torch.inference_mode()
def segment_labels(
    model: nn.Module,
    image: torch.Tensor,
    *,
    num_classes: int,
    mode: str = "whole",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    test_scale: tuple[float, float] | None = None,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: tuple[int, int],
    batch_size: int = 8,
) -> torch.Tensor:
    """(out_h, out_w) int64 labels: the argmax of :func:`segment_probs` (same arguments), in bounded memory.

    mmseg holds K x out_h x out_w probabilities (plus, here, two same-size temporaries per augmentation). That is
    what this does up to ``TTA_FULL_SIZE_LIMIT`` floats. Above it, if all augmentations' logits at their own sizes
    take fewer floats than that accumulator (a photo much larger than the test scale: those sizes do not grow
    with the photo), they are held instead and the output is made in bands of rows: each augmentation's band
    resized by :func:`resize_rows`, softmaxed, summed, divided and arg-maxed. Peak memory is then those logits
    plus a few bands of at most the limit, whatever the photo's size; labels are the same except at ties within
    float rounding. Without a test scale the working sizes grow with the photo, so the accumulator is kept.
    """
    image = _one_image(image)
    out_h, out_w = check_pair("output size", out_size)
    sizes = scale_sizes(*image.shape[-2:], test_scale=test_scale, ratios=ratios)
    views = len(sizes) * (2 if flip else 1)
    full = num_classes * out_h * out_w
    held = num_classes * sum(h * w for h, w in sizes) * (2 if flip else 1)
    if full <= TTA_FULL_SIZE_LIMIT or held >= full:
        return segment_probs(model, image, num_classes=num_classes, mode=mode, window=window, stride=stride,
                             test_scale=test_scale, ratios=ratios, flip=flip, out_size=(out_h, out_w),
                             batch_size=batch_size).argmax(0)
    dtype = torch.promote_types(image.dtype, torch.float32)
    augmented = augmented_logits(model, image, num_classes=num_classes, mode=mode, window=window, stride=stride,
                                  sizes=sizes, flip=flip, batch_size=batch_size)
    logits = [view[0].to(dtype) for view in augmented]  # each at its own size: what stays in memory
    labels = torch.empty(out_h, out_w, dtype=torch.int64, device=image.device)
    band_rows = max(1, TTA_FULL_SIZE_LIMIT // (num_classes * out_w))
    for first in range(0, out_h, band_rows):
        rows = slice(first, min(first + band_rows, out_h))
        probs = sum(resize_rows(view, (out_h, out_w), rows).softmax(dim=0) for view in logits)
        labels[rows] = probs.div_(views).argmax(0)
    return labels
