"""How sure a segmentation is, per pixel: the top class probability, the entropy of the class probabilities and,
with test-time augmentation, how many augmented views disagree with the final label.

The probabilities are those :func:`~regproxy_cli.inference.predictor.predict_labels` takes the argmax of: each
view's logits resized bilinearly to the image's size, softmaxed (and with TTA averaged over the views, in mmseg's
``aug_test`` order). They are made in bands of rows with :func:`~regproxy_cli.inference.protocol.resize_rows`
from the logits at the model's own resolution, so a huge photo never needs a K x H x W tensor: peak memory is
the views' logits plus a band of at most ``CONFIDENCE_BAND_LIMIT`` floats (and a few of its temporaries).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from regproxy_cli.errors import RegproxyError
from regproxy_cli.inference.predictor import device_of, normalise, to_rgb_array
from regproxy_cli.inference.protocol import TestProtocol, augmented_logits, network_logits, resize_rows
from regproxy_cli.inference.runtime import autocast
from regproxy_cli.model.plugins import get_backbone
from regproxy_cli.model.resize import padded_size

CONFIDENCE_BAND_LIMIT = 1 << 24  # K x rows x W floats (64 MB) of image-size scores resized at a time


@dataclass
class ConfidenceMaps:
    """One image's labels and how sure they are, all at the image's size except ``probs``.

    Attributes:
        labels: (H, W) int64 class ids, the argmax of the probabilities (``predict_labels``' labels up to float
            rounding ties).
        max_prob: (H, W) float32, the top class probability, 1/K (no idea) to 1 (sure).
        entropy: (H, W) float32, the entropy of the class probabilities in nats, 0 (sure) to ln K (uniform).
        disagreement: (H, W) float32 with TTA, else None: the fraction of augmented views (scales and flips) whose
            own argmax differs from the final label.
        probs: with ``grid_probs``, (K, h, w) float32 class probabilities at the model's output resolution (see
            :func:`predict_confidence`), else None.
        views: how many views were averaged (1, or 12 with TTA).
    """

    labels: np.ndarray
    max_prob: np.ndarray
    entropy: np.ndarray
    disagreement: np.ndarray | None = None
    probs: np.ndarray | None = None
    views: int = 1


def output_stride(model: nn.Module) -> tuple[int, int]:
    """Image pixels per output cell of ``model``: its backbone's stride over the region resolution (RegProxy; 4
    for the /16 models) or the stride itself (the linear baseline); (1, 1) when the backbone is unknown."""
    config = model.config
    stride = model.stride
    if not model.has_grid_logits:  # an exported graph pads inside: its backbone's declared stride, if installed
        try:
            stride = get_backbone(config.backbone).stride
        except RegproxyError:
            return 1, 1
    if config.baseline:
        return stride, stride
    return max(1, stride // config.region_res[0]), max(1, stride // config.region_res[1])


def _under_autocast(views: Iterator[torch.Tensor], device: torch.device, precision: str) -> Iterator[torch.Tensor]:
    """Each view of a lazy generator computed under autocast, handed out (float32, batch dimension dropped) outside
    it: the network runs at ``precision``, the resizing and the statistics in float32."""
    while True:
        with autocast(device, precision):
            view = next(views, None)
        if view is None:
            return
        yield view[0].float()


def _band_rows(num_classes: int, width: int) -> int:
    return max(1, CONFIDENCE_BAND_LIMIT // (num_classes * width))


def _band_statistics(probs: torch.Tensor, rows: slice, maps: dict[str, torch.Tensor]) -> None:
    """Labels, top probability and entropy of a (K, r, W) band of probabilities, written into ``maps``' rows."""
    top, labels = probs.max(0)
    maps["labels"][rows] = labels
    maps["max_prob"][rows] = top
    maps["entropy"][rows] = -torch.special.xlogy(probs, probs).sum(0)  # 0 log 0 = 0


def _image_size_band(logits: torch.Tensor, frame: tuple[int, int], rows: slice, width: int) -> torch.Tensor:
    """Rows ``rows`` of the (K, h, w) logits resized bilinearly to ``frame``, cropped to the image's ``width``."""
    return resize_rows(logits, frame, rows)[:, :, :width]


def _statistics_from_held_views(
    views: list[tuple[torch.Tensor, tuple[int, int]]], out_size: tuple[int, int], disagreement: bool
) -> dict[str, torch.Tensor]:
    """Every view's logits are held; each band of output rows is resized from all of them, softmaxed, averaged."""
    height, width = out_size
    device = views[0][0].device
    maps = _empty_maps(out_size, device, disagreement)
    band_rows = _band_rows(views[0][0].shape[0], width)
    for first in range(0, height, band_rows):
        rows = slice(first, min(first + band_rows, height))
        probs, view_labels = None, []
        for logits, frame in views:
            scores = _image_size_band(logits, frame, rows, width)
            if disagreement:
                view_labels.append(scores.argmax(0))
            softmax = scores.softmax(dim=0)
            probs = softmax if probs is None else probs.add_(softmax)
        _band_statistics(probs.div_(len(views)), rows, maps)
        if disagreement:
            maps["disagreement"][rows] = _disagreeing(view_labels, maps["labels"][rows])
    return maps


def _statistics_from_accumulator(
    views: Iterator[tuple[torch.Tensor, tuple[int, int]]], num_views: int, num_classes: int,
    out_size: tuple[int, int], device: torch.device, disagreement: bool,
) -> dict[str, torch.Tensor]:
    """Each view is resized (band by band), softmaxed and added to a K x H x W sum as it comes, then dropped; its
    labels are kept in a compact (views, H, W) array for the disagreement. For TTA without a test scale, whose
    views together outweigh the sum."""
    height, width = out_size
    total = torch.zeros(num_classes, height, width, device=device)
    label_dtype = torch.uint8 if num_classes <= 256 else torch.int32
    view_labels = torch.empty(num_views, height, width, dtype=label_dtype, device=device) if disagreement else None
    band_rows = _band_rows(num_classes, width)
    for index, (logits, frame) in enumerate(views):
        for first in range(0, height, band_rows):
            rows = slice(first, min(first + band_rows, height))
            scores = _image_size_band(logits, frame, rows, width)
            if view_labels is not None:
                view_labels[index, rows] = scores.argmax(0).to(label_dtype)
            total[:, rows] += scores.softmax(dim=0)
    maps = _empty_maps(out_size, device, disagreement)
    for first in range(0, height, band_rows):
        rows = slice(first, min(first + band_rows, height))
        _band_statistics(total[:, rows] / num_views, rows, maps)
        if view_labels is not None:
            maps["disagreement"][rows] = _disagreeing(view_labels[:, rows], maps["labels"][rows])
    return maps


def _disagreeing(view_labels: list[torch.Tensor] | torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fraction of views whose labels differ from ``labels``, per pixel."""
    stacked = view_labels if isinstance(view_labels, torch.Tensor) else torch.stack(view_labels)
    return (stacked.long() != labels).float().mean(0)


def _empty_maps(out_size: tuple[int, int], device: torch.device, disagreement: bool) -> dict[str, torch.Tensor]:
    maps = {"labels": torch.empty(out_size, dtype=torch.int64, device=device),
            "max_prob": torch.empty(out_size, device=device), "entropy": torch.empty(out_size, device=device)}
    if disagreement:
        maps["disagreement"] = torch.empty(out_size, device=device)
    return maps


def _grid_probs(logits: torch.Tensor, grid: tuple[int, int], native: bool) -> torch.Tensor:
    """(K, gh, gw) probabilities of one view at the output grid: its own grid cropped to the image (``native``:
    grid logits of the padded frame), else its logits resized bilinearly to the grid."""
    if native:
        scores = logits[:, : grid[0], : grid[1]]
    else:
        scores = F.interpolate(logits[None], size=grid, mode="bilinear", align_corners=False)[0]
    return scores.softmax(dim=0)


@torch.inference_mode()
def predict_confidence(
    model: nn.Module,
    image: str | os.PathLike | Image.Image | np.ndarray,
    *,
    mode: str | None = None,
    tta: bool = False,
    scale: float = 1.0,
    batch_size: int = 8,
    precision: str = "fp32",
    grid_probs: bool = False,
) -> ConfidenceMaps:
    """Labels, top probability, entropy (and with ``tta`` the views' disagreement) of one image at its size.

    The protocol and the arguments are :func:`~regproxy_cli.inference.predictor.predict_labels`'; the network runs
    once. ``grid_probs`` also returns the class probabilities at the model's output resolution: the working size
    (the image at the test scale) divided by :func:`output_stride`, rounded up, e.g. 128 x 171 for a photo that
    S/16 sees at 512 x 683. For a model run whole at the image's own size these are the softmax of its grid
    logits; otherwise each view's logits resized bilinearly to that grid, softmaxed and averaged.
    """
    config = model.config
    single = TestProtocol.from_config(config, mode=mode, scale=scale, batch_size=batch_size)  # the working size's
    protocol = TestProtocol.from_config(config, mode=mode, tta=True, scale=scale, batch_size=batch_size) if tta else single
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    num_classes = config.num_classes
    device = device_of(model)
    x = normalise(rgb, config, device)
    size = single.working_size(height, width)
    stride_y, stride_x = output_stride(model)
    grid = (math.ceil(size[0] / stride_y), math.ceil(size[1] / stride_x))
    native = False
    if tta:
        sizes = protocol.sizes(height, width)
        generator = augmented_logits(model, x, protocol)
        num_views, frames = protocol.views, (height, width)
        held = num_classes * 2 * sum(h * w for h, w in sizes)
    elif protocol.mode == "whole" and size == (height, width) and model.has_grid_logits:
        # the grid logits cover the image padded to the stride: resized to that frame, then cropped (the forward)
        generator = _network(model.grid_logits, x)
        num_views, frames, held, native = 1, padded_size((height, width), model.stride), 0, True
    else:
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        generator = _network(lambda batch: network_logits(model, batch, protocol), x)
        num_views, frames, held = 1, (height, width), 0
    views = ((logits, frames) for logits in _under_autocast(generator, device, precision))
    probs_sum = None

    def with_grid(stream):  # adds each view's probabilities at the output grid as it passes
        nonlocal probs_sum
        for logits, frame in stream:
            if grid_probs:
                one = _grid_probs(logits, grid, native)
                probs_sum = one if probs_sum is None else probs_sum.add_(one)
            yield logits, frame

    if tta and held > num_classes * height * width:  # without a test scale: the views outweigh a K x H x W sum
        maps = _statistics_from_accumulator(with_grid(views), num_views, num_classes, (height, width), device, True)
    else:
        maps = _statistics_from_held_views(list(with_grid(views)), (height, width), tta)
    return ConfidenceMaps(
        labels=maps["labels"].cpu().numpy(), max_prob=maps["max_prob"].cpu().numpy(),
        entropy=maps["entropy"].cpu().numpy(),
        disagreement=maps["disagreement"].cpu().numpy() if tta else None,
        probs=(probs_sum / num_views).cpu().numpy() if grid_probs else None, views=num_views,
    )


def _network(function, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """A one-view generator: ``function(x)`` evaluated lazily, so that it runs under the caller's autocast."""
    yield function(x)
