"""Test-time inference as mmsegmentation 0.17 does it for the authors' evaluation: whole-image or sliding-window
logits, keep-ratio test scales, multi-scale + flip averaging of probabilities, and a memory-bounded resize + argmax.

Everything here is pure torch on an already-normalised float tensor (see ``model.IMAGENET_MEAN``/``IMAGENET_STD``);
loading, normalising and saving images is the caller's business.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regproxy_cli.errors import RegproxyError

MODES = ("whole", "slide")
PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(device: torch.device | str, precision: str = "fp32") -> torch.autocast:
    """The autocast context for running a model at ``precision`` (fp32: a disabled one, i.e. plain fp32).

    bf16 runs on CPUs (fast where they have AVX512-BF16 or AMX) and GPUs; fp16 only on CUDA.
    """
    if precision not in PRECISIONS:
        raise RegproxyError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device_type = torch.device(device).type
    if precision == "fp16" and device_type != "cuda":
        raise RegproxyError("fp16 needs a CUDA device; use bf16 on CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def compile_backbone(model: nn.Module, precision: str = "fp32", size: tuple[int, int] | None = None) -> None:
    """``--compile``: ``torch.compile`` the backbone in place (with inductor's freezing of the inference weights).

    The backbone is where the time goes; the head and the label step are small or already fused kernels. One warm-up
    forward at ``size`` (the sliding window; default 2x2 tokens) compiles it now, so a machine without what inductor
    needs (a C++ compiler on CPU, Triton on GPU) gives one error line before any image is read. Other input sizes
    compile again on first sight (then with dynamic shapes). Measured on CPU (bench/run.py --compile): S/16 at 512^2
    ~5% faster after ~15 s of compiling; worth it for many images of one size, not for one photo. After a failure
    the backbone stays marked for compiling (there is no public undo): reload the model to run it eagerly.
    """
    backbone = model.backbone
    stride = backbone.stride
    first = next(model.parameters())
    backbone.compile(options={"freezing": True})
    example = torch.zeros(1, 3, *(size or (2 * stride, 2 * stride)), device=first.device)
    try:
        with torch.inference_mode(), autocast(first.device, precision):
            backbone(example)
    except RuntimeError as exc:  # dynamo's and inductor's errors (no C++ compiler, no Triton, unsupported op)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegproxyError(f"torch.compile failed on this machine ({message}); run without --compile") from exc


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


def _check_pair(name: str, value: Sequence[int]) -> tuple[int, int]:
    """Validate a (height, width) pair of positive integers; a user-facing error otherwise."""
    if len(value) != 2 or not all(int(v) == v and v >= 1 for v in value):
        raise RegproxyError(f"{name} must be two positive integers (height, width), got {tuple(value)}")
    return int(value[0]), int(value[1])


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
    win_h, win_w = _check_pair("window", window)
    stride_h, stride_w = _check_pair("stride", stride)
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
def whole_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Whole-image logits: the model on the full (B, 3, H, W) batch, giving (B, K, H, W)."""
    return model(images)


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The size mmseg's ``Resize(keep_ratio=True)`` (mmcv ``rescale_size``) gives an image for a test scale.

    The image is scaled by ``min(long / max(h, w), short / min(h, w))`` with ``long, short = max(scale),
    min(scale)``, so the long side is at most ``long`` and the short side at most ``short``; sides round half up.

    Args:
        height: the image height.
        width: the image width.
        scale: (long_max, short_max), e.g. (2048, 512) for ADE20K; the order does not matter, as in mmcv.

    Returns:
        (new_height, new_width).
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


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
    out_size = _check_pair("output size", out_size)
    height, width = image.shape[-2:]

    def run(batch: torch.Tensor) -> torch.Tensor:
        if mode == "slide":
            return slide_logits(model, batch, num_classes=num_classes, window=window, stride=stride,
                                batch_size=batch_size)
        return whole_logits(model, batch)

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


def bilinear_taps(
    in_size: int, out_size: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower, upper, frac) of PyTorch's 1-D bilinear resize, align_corners=False, as ATen's CPU kernel computes it.

    out[i] = (1 - frac[i]) * x[lower[i]] + frac[i] * x[upper[i]], with source = (dst + 0.5) * in / out - 0.5 clamped
    at 0, and both taps clamped to the last input.
    """
    scale = in_size / out_size
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    src = ((dst + 0.5) * scale - 0.5).clamp(min=0)
    lower = src.to(torch.int64).clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    frac = (src - lower).clamp(0, 1)
    return lower, upper, frac


def bilinear_weights(in_size: int, out_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(out_size, in_size) matrix W with ``W @ x`` equal to PyTorch's 1-D bilinear resize (see :func:`bilinear_taps`)."""
    lower, upper, frac = bilinear_taps(in_size, out_size, device)
    weights = torch.zeros(out_size, in_size, dtype=torch.float32, device=device)
    rows = torch.arange(out_size, device=device)
    # index_put_ with accumulate: at the last input both taps are the same column and their weights must add up.
    weights.index_put_((rows, lower), 1 - frac, accumulate=True)
    weights.index_put_((rows, upper), frac, accumulate=True)
    return weights


def resized_row_chunks(
    scores: torch.Tensor, size: tuple[int, int], chunk_rows: int = 256
) -> Iterator[tuple[int, torch.Tensor]]:
    """Bilinearly resize (K, h, w) scores to ``size`` a band of output rows at a time.

    Rows are two-tap blends of whole input rows; columns go through ``F.interpolate`` on the band at full width, where
    the height is unchanged (an identity) and the width scale is the global one, so the band equals the global
    resize. Time is O(K x H x W), memory O(K x chunk_rows x W) however large the output.

    Args:
        scores: (K, h, w) scores (logits or probabilities).
        size: (H, W) of the output.
        chunk_rows: output rows per band.

    Yields:
        (first_row, band) with band a float32 (K, rows, W) tensor: rows ``first_row:first_row + rows`` of
        ``F.interpolate(scores[None], size, mode="bilinear", align_corners=False)[0]``.
    """
    out_h, out_w = _check_pair("output size", size)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    _, in_h, _ = scores.shape
    scores = scores.float()
    low_y, high_y, frac_y = bilinear_taps(in_h, out_h, scores.device)
    for first in range(0, out_h, chunk_rows):
        band = slice(first, first + chunk_rows)
        rows = torch.lerp(scores[:, low_y[band]], scores[:, high_y[band]], frac_y[band, None])  # (K, r, w)
        yield first, F.interpolate(rows[None], size=(rows.shape[1], out_w), mode="bilinear", align_corners=False)[0]


DIRECT_RESIZE_LIMIT = 1 << 26  # K x H x W floats (256 MB) above which labels are always made boundary-first
DIRECT_MIXED_FRACTION = 0.25  # above this share of boundary output pixels, the fused resize + argmax is faster


def batch_of_one(scores: torch.Tensor) -> torch.Tensor:
    """(K, h, w) -> (1, K, h, w), keeping a channels-last layout one that PyTorch's kernels recognise.

    ``scores[None]`` of a channels-last slice has a batch stride of K, and ``F.interpolate`` then falls back to a
    generic kernel about 8x slower (1 s instead of 0.13 s for 150 classes, 128^2 -> 512^2).
    """
    if scores.dim() == 3 and scores.stride(0) == 1 and scores.shape[0] > 1:
        return scores.permute(1, 2, 0).unsqueeze(0).permute(0, 3, 1, 2)
    return scores.unsqueeze(0)


@torch.inference_mode()
def resize_argmax(scores: torch.Tensor, size: tuple[int, int], chunk_rows: int = 256) -> torch.Tensor:
    """The label map ``F.interpolate(scores[None], size, mode="bilinear", align_corners=False)[0].argmax(0)``.

    A bilinear output is a convex blend of its 4 source pixels, so where all 4 share their argmax the blend
    has it too: only pixels on label boundaries need their K scores blended. Work and memory then scale with
    the boundary, not with K x H x W: a 24-megapixel photo with 150 classes takes seconds, and RegProxy's
    stride-4 logits (smooth, few boundary pixels) give a 512^2 label map 3x faster than resize-then-argmax.
    When most output pixels are on a boundary (a coarse, noisy map) and the output is small enough, the fused
    resize + argmax is used instead. Values agree with PyTorch's to float32 rounding, hence the labels except
    at near-exact ties.

    Args:
        scores: (K, h, w) scores.
        size: (H, W) of the label map.
        chunk_rows: output rows handled at a time.

    Returns:
        (H, W) int64 class ids.
    """
    out_h, out_w = _check_pair("output size", size)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    classes, in_h, in_w = scores.shape
    scores = scores.float()
    if (in_h, in_w) == (out_h, out_w):
        return scores.argmax(0)
    source_labels = scores.argmax(0)
    low_y, high_y, frac_y = bilinear_taps(in_h, out_h, scores.device)
    low_x, high_x, frac_x = bilinear_taps(in_w, out_w, scores.device)

    def corners(band: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-left source label of each output pixel in the band, and where the 4 source labels differ."""
        top, bottom = source_labels[low_y[band]], source_labels[high_y[band]]  # (r, w)
        first = top[:, low_x]
        mixed = (first != top[:, high_x]) | (first != bottom[:, low_x]) | (first != bottom[:, high_x])
        return first, mixed

    # a small output gets its corners once, whole (to choose the path, then reused band by band);
    # a large one only ever a band at a time, so memory stays bounded
    whole = corners(slice(None)) if classes * out_h * out_w <= DIRECT_RESIZE_LIMIT else None
    if whole is not None and whole[1].float().mean().item() > DIRECT_MIXED_FRACTION:  # mostly boundary
        resized = F.interpolate(batch_of_one(scores), size=(out_h, out_w), mode="bilinear", align_corners=False)
        return resized[0].argmax(0)
    scores_hwk = scores.permute(1, 2, 0).contiguous()  # gathers of whole K-vectors are contiguous reads
    labels = torch.empty(out_h, out_w, dtype=torch.int64, device=scores.device)
    for first_row in range(0, out_h, chunk_rows):
        band = slice(first_row, first_row + chunk_rows)
        out, mixed = (whole[0][band], whole[1][band]) if whole is not None else corners(band)
        rows, cols = mixed.nonzero(as_tuple=True)
        if rows.numel():
            # blend the band's source rows once (r, w, K), then the two columns of each boundary pixel
            blended_rows = torch.lerp(scores_hwk[low_y[band]], scores_hwk[high_y[band]], frac_y[band, None, None])
            left, right = blended_rows[rows, low_x[cols]], blended_rows[rows, high_x[cols]]  # (n, K)
            out[rows, cols] = torch.lerp(left, right, frac_x[cols, None]).argmax(1)
        labels[band] = out
    return labels
