"""The test protocol as mmsegmentation 0.17 runs it for the authors' evaluation: whole-image or sliding-window
logits, keep-ratio test scales, and multi-scale + flip averaging of probabilities.

Everything here is pure torch on an already-normalised float tensor (see ``constants.IMAGENET_MEAN``/``IMAGENET_STD``);
loading, normalising and saving images is :mod:`regproxy_cli.inference.predictor`'s business.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from regproxy_cli.constants import INFERENCE_MODES
from regproxy_cli.data.transforms import rescale_size
from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.model.resize import check_pair, resize_rows

TTA_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the paper's multi-scale test


@dataclass(frozen=True)
class TestProtocol:
    """How a model sees one image at test time (mmseg 0.17's ``test_cfg`` and ``aug_test``), as one value.

    Built from a model's config by :meth:`from_config` (what predict, eval, the confidence maps and the demo all
    do), or written out by hand for a bare network.

    Attributes:
        num_classes: K.
        mode: ``"whole"`` or ``"slide"``.
        window: the sliding window (wh, ww); required for ``"slide"``.
        stride: the sliding stride (sh, sw); required for ``"slide"``.
        test_scale: (long_max, short_max) as in mmseg's test pipeline; None keeps the input size (times r).
        ratios: scale ratios, e.g. :data:`TTA_RATIOS` for the paper's multi-scale numbers.
        flip: also average the horizontally flipped image.
        batch_size: windows per forward call in ``"slide"`` mode.
    """

    __test__ = False  # a protocol, not a pytest test class

    num_classes: int
    mode: str = "whole"
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    test_scale: tuple[float, float] | None = None
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.mode not in INFERENCE_MODES:
            raise RegproxyError(f"inference mode must be one of {', '.join(INFERENCE_MODES)}, got {self.mode!r}")
        if self.mode == "slide" and (self.window is None or self.stride is None):
            raise RegproxyError("sliding-window inference needs a window and a stride")
        if not self.ratios:
            raise RegproxyError("at least one test scale ratio is needed")
        if any(ratio <= 0 for ratio in self.ratios):
            raise RegproxyError(f"test scale ratios must be positive, got {list(self.ratios)}")
        if self.batch_size < 1:
            raise RegproxyError(f"the window batch must be at least 1, got {self.batch_size}")
        object.__setattr__(self, "ratios", tuple(self.ratios))

    @classmethod
    def from_config(cls, config: ModelConfig, *, mode: str | None = None, tta: bool = False, scale: float = 1.0,
                    batch_size: int = 8) -> TestProtocol:
        """The protocol of ``config``: its mode (or ``mode``), its crop-sized windows and stride, its test scale
        times ``scale`` (without one, the image size times ``scale``); with ``tta`` the paper's multi-scale ratios
        and flip."""
        if scale <= 0:
            raise RegproxyError(f"scale must be positive, got {scale}")
        test_scale = None if config.test_scale is None else (config.test_scale[0] * scale, config.test_scale[1] * scale)
        if tta:
            ratios = TTA_RATIOS if test_scale is not None else tuple(ratio * scale for ratio in TTA_RATIOS)
        else:
            ratios = (1.0,) if test_scale is not None else (scale,)
        return cls(num_classes=config.num_classes, mode=mode or config.inference_mode,
                   window=(config.crop_size,) * 2, stride=(config.stride,) * 2, test_scale=test_scale,
                   ratios=ratios, flip=tta, batch_size=batch_size)

    @property
    def views(self) -> int:
        """How many augmented views are averaged: scales times flips."""
        return len(self.ratios) * (2 if self.flip else 1)

    def sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The size an H x W image is resized to for each ratio (:func:`scale_sizes`)."""
        return scale_sizes(height, width, test_scale=self.test_scale, ratios=self.ratios)

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """The one size the model sees without augmentation: the keep-ratio test scale, or the image times the
        ratio (rounded as predict always has)."""
        if self.test_scale is None:
            return max(1, round(height * self.ratios[0])), max(1, round(width * self.ratios[0]))
        return rescale_size(height, width, self.test_scale)


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


def augmented_logits(model: nn.Module, image: torch.Tensor, protocol: TestProtocol) -> Iterator[torch.Tensor]:
    """(1, K, h, w) logits of each scale (and mirrored view, mirrored back) at its own size, in aug_test's order.

    A generator: each view is computed when it is asked for, so a caller can use and drop one before the next.
    """
    for size in protocol.sizes(*image.shape[-2:]):
        scaled = image
        if size != tuple(image.shape[-2:]):
            scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if protocol.flip else (False,):
            view = scaled.flip(-1) if flipped else scaled
            logits = network_logits(model, view, protocol)
            yield logits.flip(-1) if flipped else logits


def network_logits(model: nn.Module, x: torch.Tensor, protocol: TestProtocol) -> torch.Tensor:
    """(B, K, h, w) logits of a normalised batch at its own size: whole, or in the protocol's sliding windows."""
    if protocol.mode == "whole":
        return model(x)
    return slide_logits(model, x, num_classes=protocol.num_classes, window=protocol.window, stride=protocol.stride,
                        batch_size=protocol.batch_size)


def _one_image(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, 3, H, W) or (3, H, W), got {tuple(image.shape)}")
    return image


@torch.inference_mode()
def segment_probs(model: nn.Module, image: torch.Tensor, protocol: TestProtocol, out_size: tuple[int, int]
                  ) -> torch.Tensor:
    """Class probabilities of one image with mmseg's (multi-scale, flip) ``aug_test``.

    For every ratio r the image is resized bilinearly to its :func:`scale_sizes` size, run whole or sliding-window
    (and, with ``flip``, also mirrored, its logits mirrored back); each logit map is resized bilinearly to
    ``out_size`` and softmaxed, and the probabilities are averaged over all scales and flips.

    Args:
        model: maps a normalised (N, 3, h, w) batch to (N, K, h, w) logits.
        image: the normalised image, (1, 3, H, W) or (3, H, W).
        protocol: mode, windows, test scale, ratios, flip (:class:`TestProtocol`).
        out_size: (height, width) of the probabilities: mmseg's is the original image's size.

    Returns:
        (K, out_h, out_w) probabilities, summing to 1 over the classes.
    """
    image = _one_image(image)
    out_size = check_pair("output size", out_size)
    dtype = torch.promote_types(image.dtype, torch.float32)
    probs = image.new_zeros((protocol.num_classes, *out_size), dtype=dtype)
    for logits in augmented_logits(model, image, protocol):
        logits = F.interpolate(logits.to(probs.dtype), size=out_size, mode="bilinear", align_corners=False)
        probs += logits[0].softmax(dim=0)
    return probs.div_(protocol.views)


@torch.inference_mode()
def segment_labels(model: nn.Module, image: torch.Tensor, protocol: TestProtocol, out_size: tuple[int, int]
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
    num_classes = protocol.num_classes
    full = num_classes * out_h * out_w
    held = num_classes * sum(h * w for h, w in protocol.sizes(*image.shape[-2:])) * (2 if protocol.flip else 1)
    if full <= TTA_FULL_SIZE_LIMIT or held >= full:
        return segment_probs(model, image, protocol, (out_h, out_w)).argmax(0)
    dtype = torch.promote_types(image.dtype, torch.float32)
    logits = [view[0].to(dtype) for view in augmented_logits(model, image, protocol)]  # each at its own size
    labels = torch.empty(out_h, out_w, dtype=torch.int64, device=image.device)
    band_rows = max(1, TTA_FULL_SIZE_LIMIT // (num_classes * out_w))
    for first in range(0, out_h, band_rows):
        rows = slice(first, min(first + band_rows, out_h))
        probs = sum(resize_rows(view, (out_h, out_w), rows).softmax(dim=0) for view in logits)
        labels[rows] = probs.div_(protocol.views).argmax(0)
    return labels
