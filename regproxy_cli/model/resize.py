"""From the model's grid-aligned logits to the input size: the bilinear resize (align_corners=False), its
deterministic form for training under ``run.deterministic``, and a resize + argmax that goes straight to labels (a
boundary-only blend on CPUs, a fused resize + argmax on GPUs)."""

from __future__ import annotations

import functools
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
    Under ``torch.use_deterministic_algorithms`` (``run.deterministic``) a resize that needs a gradient goes through
    :func:`bilinear_resize_matmul`: CUDA's bilinear backward adds with atomics, in no fixed order.
    """
    logits = logits.float()
    out_h, out_w = padded_size(size, stride)
    if tuple(logits.shape[-2:]) != (out_h, out_w):
        if torch.is_grad_enabled() and logits.requires_grad and torch.are_deterministic_algorithms_enabled():
            logits = bilinear_resize_matmul(logits, (out_h, out_w))
        else:
            logits = F.interpolate(logits, size=(out_h, out_w), mode="bilinear", align_corners=False)
    return logits[..., : size[0], : size[1]]


def interpolation_matrix(in_size: int, out_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(out_size, in_size) float32 matrix of the 1-D bilinear resize (align_corners=False): two taps per row."""
    lower, upper, frac = bilinear_taps(in_size, out_size)
    matrix = torch.zeros(out_size, in_size)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, lower), 1 - frac, accumulate=True)  # on the CPU: a constant, built once per call
    matrix.index_put_((rows, upper), frac, accumulate=True)
    return matrix.to(device)


def bilinear_resize_matmul(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` of a (..., h, w) float tensor as two matrix
    products, whose backward is again matrix products: deterministic on GPUs (with cuBLAS's fixed workspace),
    unlike the bilinear kernel's backward. Equal to the kernel up to float32 rounding; more arithmetic (each output
    pixel reads a whole row and column of the matrices), which a GPU does in a few milliseconds per batch."""
    out_h, out_w = size
    rows = interpolation_matrix(x.shape[-2], out_h, x.device).to(x.dtype)
    cols = interpolation_matrix(x.shape[-1], out_w, x.device).to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):  # autocast would run these matmuls in bf16/fp16
        return rows @ (x @ cols.T)


def resize_rows(logits: torch.Tensor, out_size: tuple[int, int], rows: slice) -> torch.Tensor:
    """Rows ``rows`` of ``F.interpolate(logits[None], out_size, mode="bilinear", align_corners=False)[0]``.

    Made from the (K, h, w) input with :func:`bilinear_taps`, the taps PyTorch's kernel uses, so values agree with
    the full resize to float rounding, without ever holding it.
    """
    out_h, out_w = out_size
    low_y, high_y, frac_y = (taps[rows] for taps in bilinear_taps(logits.shape[1], out_h, logits.device))
    low_x, high_x, frac_x = bilinear_taps(logits.shape[2], out_w, logits.device)
    blended = torch.lerp(logits[:, low_y], logits[:, high_y], frac_y[:, None])  # (K, r, w): rows first
    return torch.lerp(blended[:, :, low_x], blended[:, :, high_x], frac_x)


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


CANDIDATES = 3  # classes per source pixel whose blends a boundary pixel computes first (bound-checked, see below)
CHUNK_ELEMENTS = 1 << 21  # candidate blends (cells x rows x cols x candidates) computed at a time: memory stays bounded
DIRECT_RESIZE_LIMIT = 1 << 26  # K x H x W floats (256 MB) up to which the fused resize + argmax may be used ...
DIRECT_UNSURE_FRACTION = 0.2  # ... once this share of a chunk's pixels needs all K blended (noise-like scores)


def batch_of_one(scores: torch.Tensor) -> torch.Tensor:
    """(K, h, w) -> (1, K, h, w), keeping a channels-last layout one that PyTorch's kernels recognise.

    ``scores[None]`` of a channels-last slice has a batch stride of K, and ``F.interpolate`` then falls back to a
    generic kernel about 8x slower (1 s instead of 0.13 s for 150 classes, 128^2 -> 512^2).
    """
    if scores.dim() == 3 and scores.stride(0) == 1 and scores.shape[0] > 1:
        return scores.permute(1, 2, 0).unsqueeze(0).permute(0, 3, 1, 2)
    return scores.unsqueeze(0)


def label_method(device: torch.device) -> str:
    """How :func:`resize_argmax` makes labels on ``device``: ``fused`` on GPUs (one resize kernel and one argmax
    kernel per band of rows, no host round trip), ``boundary`` elsewhere (:func:`boundary_resize_argmax`: tuned for
    CPUs, whose cost is the K x H x W resize; on a GPU its several host synchronisations per image and
    content-dependent work cost more than the resize; bench/gpu_check.py measures both)."""
    return "fused" if device.type == "cuda" else "boundary"


@torch.inference_mode()
def resize_argmax(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The label map ``F.interpolate(scores[None], size, mode="bilinear", align_corners=False)[0].argmax(0)``, made
    the way that is fastest on the scores' device (:func:`label_method`).

    Args:
        scores: (K, h, w) scores.
        size: (H, W) of the label map.

    Returns:
        (H, W) int64 class ids.
    """
    if label_method(scores.device) == "fused":
        return fused_resize_argmax(scores, size)
    return boundary_resize_argmax(scores, size)


@torch.inference_mode()
def fused_resize_argmax(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`resize_argmax` as resize then argmax, in bands of rows of at most ``DIRECT_RESIZE_LIMIT`` values, so a
    huge output never holds K x H x W floats (bands use :func:`resize_rows`, equal to the kernel up to rounding)."""
    out_h, out_w = check_pair("output size", size)
    scores = scores.float()
    band = max(1, DIRECT_RESIZE_LIMIT // (scores.shape[0] * out_w))
    if band >= out_h:
        resized = F.interpolate(batch_of_one(scores), size=(out_h, out_w), mode="bilinear", align_corners=False)
        return resized[0].argmax(0)
    return torch.cat([resize_rows(scores, (out_h, out_w), slice(top, min(top + band, out_h))).argmax(0)
                      for top in range(0, out_h, band)])


@torch.inference_mode()
def boundary_resize_argmax(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`resize_argmax` by blending only at label boundaries (the CPU's way).

    Output pixels whose 4 bilinear source pixels (a *cell*) share one argmax take it: a convex blend keeps it. Only
    cells on a label boundary are blended, and not over all K classes: each source pixel's top ``CANDIDATES``
    classes are blended first, and a class outside a pixel's candidates scores at most the blend of its corners'
    ``CANDIDATES``-th scores; where the best candidate beats that bound, it is the argmax. The few pixels where it
    does not (near-ties) blend all K. So work and memory scale with the boundary and not with K x H x W: a
    24-megapixel photo with 150 classes takes seconds, and 150-class stride-4 logits give a 512^2 label map in a
    fraction of the time of resize-then-argmax, even from a random-weight model on noise. Where the candidates
    settle too few pixels (scores with no spatial coherence, or near-ties everywhere) and the output is small
    enough, one fused resize + argmax is used instead. Blends are computed in PyTorch's order (rows,
    then columns, with ``torch.lerp``) and ties go to the lowest class, as ``argmax`` does, so labels equal
    PyTorch's except where float32 rounding makes two classes tie differently.

    Args:
        scores: (K, h, w) scores.
        size: (H, W) of the label map.

    Returns:
        (H, W) int64 class ids.
    """
    out_h, out_w = check_pair("output size", size)
    classes, in_h, in_w = scores.shape
    scores = scores.float()
    if (in_h, in_w) == (out_h, out_w):
        return scores.argmax(0)
    device = scores.device
    low_y, high_y, frac_y = bilinear_taps(in_h, out_h, device)
    low_x, high_x, frac_x = bilinear_taps(in_w, out_w, device)
    # a cell: the output rows (columns) that share their two source rows (columns); low_* never decreases
    cell_y, row_cell, rows_per_cell = torch.unique_consecutive(low_y, return_inverse=True, return_counts=True)
    cell_x, col_cell, cols_per_cell = torch.unique_consecutive(low_x, return_inverse=True, return_counts=True)
    top = min(CANDIDATES, classes)
    pixels = scores.permute(1, 2, 0).reshape(in_h * in_w, classes)  # a view for channels-last scores
    source = pixels.argmax(1).view(in_h, in_w)
    cell_low_y, cell_high_y = cell_y, (cell_y + 1).clamp(max=in_h - 1)
    cell_low_x, cell_high_x = cell_x, (cell_x + 1).clamp(max=in_w - 1)
    upper, lower = source[cell_low_y], source[cell_high_y]
    first = upper[:, cell_low_x]
    mixed = (first != upper[:, cell_high_x]) | (first != lower[:, cell_low_x]) | (first != lower[:, cell_high_x])
    labels = first[row_cell][:, col_cell]
    mixed_y, mixed_x = mixed.nonzero(as_tuple=True)
    if mixed_y.numel() == 0:
        return labels

    def members(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cells, most) output indices of each cell, padded with its last one, and which are real."""
        offsets = torch.arange(int(counts.max()), device=device)
        starts = counts.cumsum(0) - counts
        return starts[:, None] + offsets.clamp(max=counts[:, None] - 1), offsets < counts[:, None]

    cell_rows, real_rows = members(rows_per_cell)
    cell_cols, real_cols = members(cols_per_cell)
    # candidates only where they are needed: the source pixels at the corners of boundary cells
    needed = torch.zeros(in_h * in_w, dtype=torch.bool, device=device)
    needed[cell_low_y[mixed_y] * in_w + cell_low_x[mixed_x]] = True
    needed = needed.view(in_h, in_w)
    needed[1:] |= needed[:-1].clone()  # the cells' other corners: one row down, one column right
    needed[:, 1:] |= needed[:, :-1].clone()
    needed = needed.flatten().nonzero()[:, 0]
    top_values = torch.empty(in_h * in_w, top, device=device)
    top_classes = torch.empty(in_h * in_w, top, dtype=torch.int64, device=device)
    top_values[needed], top_classes[needed] = pixels[needed].topk(top, dim=1)
    flat = pixels.reshape(-1)
    last_flat = top_values[:, -1].contiguous()
    per_cell = cell_rows.shape[1] * cell_cols.shape[1] * 4 * top
    step = max(1, CHUNK_ELEMENTS // per_cell)
    # a small first chunk: on noise-like scores it decides the fused pass before much candidate work is spent
    starts = [0, *range(min(step, max(256, mixed_y.numel() // 16)), mixed_y.numel(), step)]
    for begin, end in zip(starts, [*starts[1:], mixed_y.numel()]):
        cy, cx = mixed_y[begin:end], mixed_x[begin:end]
        corners = torch.stack([cell_low_y[cy] * in_w + cell_low_x[cx], cell_low_y[cy] * in_w + cell_high_x[cx],
                               cell_high_y[cy] * in_w + cell_low_x[cx], cell_high_y[cy] * in_w + cell_high_x[cx]], 1)
        # ascending candidates, so that argmax's first maximum is the lowest class, as for all K; repeats allowed
        candidates = top_classes[corners].reshape(len(cy), 1, 4 * top).sort(-1).values
        values = flat[corners[:, :, None] * classes + candidates]  # (n, 4 corners, 4 * top)
        rows, cols = cell_rows[cy], cell_cols[cx]  # (n, R), (n, C)
        weight_y, weight_x = frac_y[rows][:, None, :], frac_x[cols][:, None, None, :]
        # (n, candidates, R, C): candidates outermost, so the argmax reduces across whole rows of pixels
        left = torch.lerp(values[:, 0, :, None], values[:, 2, :, None], weight_y)  # (n, 4 * top, R)
        right = torch.lerp(values[:, 1, :, None], values[:, 3, :, None], weight_y)
        blend = torch.lerp(left[..., None], right[..., None], weight_x)
        best, pick = blend.max(1)  # (n, R, C)
        label = candidates[:, 0].gather(1, pick.flatten(1)).view_as(pick)
        real = real_rows[cy][:, :, None] & real_cols[cx][:, None, :]
        all_rows = rows[:, :, None].expand_as(label)[real]
        all_cols = cols[:, None, :].expand_as(label)[real]
        labels[all_rows, all_cols] = label[real]
        if top == classes:
            continue
        last = last_flat[corners]  # (n, 4): each corner's top-th score, the most an outside class has there
        bound_left = torch.lerp(last[:, 0, None], last[:, 2, None], weight_y[:, 0])  # (n, R)
        bound_right = torch.lerp(last[:, 1, None], last[:, 3, None], weight_y[:, 0])
        bound = torch.lerp(bound_left[..., None], bound_right[..., None], weight_x[:, 0])  # (n, R, C)
        margin = 4 * torch.finfo(torch.float32).eps * torch.maximum(best.abs(), bound.abs())
        unsure = (best <= bound + margin)[real]
        if classes * out_h * out_w <= DIRECT_RESIZE_LIMIT and unsure.float().mean() > DIRECT_UNSURE_FRACTION:
            # scores too close for the candidates to settle most pixels: one fused pass beats blending pixel by pixel
            resized = F.interpolate(batch_of_one(scores), size=(out_h, out_w), mode="bilinear", align_corners=False)
            return resized[0].argmax(0)
        if unsure.any():
            _blend_all(pixels, labels, all_rows[unsure], all_cols[unsure],
                       (low_y, high_y, frac_y), (low_x, high_x, frac_x), in_w)
    return labels


def _blend_all(pixels: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               taps_y: tuple[torch.Tensor, ...], taps_x: tuple[torch.Tensor, ...], in_w: int) -> None:
    """Label the given output pixels by blending all K scores of their 4 source pixels, a bounded batch at a time."""
    (low_y, high_y, frac_y), (low_x, high_x, frac_x) = taps_y, taps_x
    step = max(1, CHUNK_ELEMENTS // (4 * pixels.shape[1]))
    row = functools.partial(torch.index_select, pixels, 0)  # whole K-vectors: far faster than pixels[index]
    for begin in range(0, rows.numel(), step):
        r, c = rows[begin: begin + step], cols[begin: begin + step]
        ly, hy, lx, hx = low_y[r] * in_w, high_y[r] * in_w, low_x[c], high_x[c]
        weight_y = frac_y[r, None]
        left = torch.lerp(row(ly + lx), row(hy + lx), weight_y)
        right = torch.lerp(row(ly + hx), row(hy + hx), weight_y)
        labels[r, c] = torch.lerp(left, right, frac_x[c, None]).argmax(1)
