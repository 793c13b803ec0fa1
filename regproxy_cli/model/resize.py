"""From the model's grid-aligned logits to the input size: the bilinear resize (align_corners=False) and a
memory-bounded resize + argmax that goes straight to labels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from regproxy_cli.errors import RegproxyError


def check_pair(name: str, value: Sequence[int]) -> tuple[int, int]:
    """Validate a (height, width) pair of positive integers; a user-facing error otherwise."""
    if len(value) != 2 or not all(int(v) == v and v >= 1 for v in value):
        raise RegproxyError(f"{name} must be two positive integers (height, width), got {tuple(value)}")
    return int(value[0]), int(value[1])


def padded_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    return -(-size[0] // stride) * stride, -(-size[1] // stride) * stride


def resize_and_crop(logits: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """Resize grid-aligned logits to the padded input they cover, then crop away the padding.

    Always in float32: under bf16/fp16 autocast the full-size logits would lose precision (the loss and the
    argmax want float32 anyway), and CPU kernels resize and argmax float32 several times faster than bf16.
    """
    logits = logits.float()
    out_h, out_w = padded_size(size, stride)
    if tuple(logits.shape[-2:]) != (out_h, out_w):
        logits = F.interpolate(logits, size=(out_h, out_w), mode="bilinear", align_corners=False)
    return logits[..., : size[0], : size[1]]


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
    out_h, out_w = check_pair("output size", size)
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
