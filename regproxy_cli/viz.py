"""Pictures of what a model does: colour overlays of label maps and the paper's picture of learned regions
(Figures 6 and 8)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from regproxy_cli.errors import RegproxyError
from regproxy_cli.images import palette_array
from regproxy_cli.inference.predictor import device_of, normalise, working_size

REGION_ALPHA = 0.45  # how strongly region colours cover the photo in region_map
_BOUNDARY = np.array([255, 255, 255], dtype=np.uint8)


def colorize(labels: np.ndarray, palette: Any) -> np.ndarray:
    """(H, W) class ids to an (H, W, 3) uint8 image in the palette's colours.

    Raises:
        ValueError: an id is negative or has no colour.
    """
    colours = palette_array(palette)
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= len(colours)):
        raise ValueError(f"label ids must be in 0..{len(colours) - 1}, got {labels.min()}..{labels.max()}")
    return colours[labels]


def overlay(image: np.ndarray, labels: np.ndarray, palette: Any, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured label map over the photo: ``(1 - alpha) x image + alpha x colours``.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) class ids.
        palette: (K, 3) colours.
        alpha: weight of the label colours, 0 (photo only) to 1 (labels only).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = np.asarray(image)
    colours = colorize(labels, palette)
    if image.shape != colours.shape:
        raise ValueError(f"image {image.shape} and labels {np.asarray(labels).shape} differ in size")
    return _blend(image, colours, alpha)


def _blend(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.rint(blended).clip(0, 255).astype(np.uint8)


def token_colours(tokens: np.ndarray) -> np.ndarray:
    """Deterministic, well-spread colours for token indices: (...,) int array to (..., 3) uint8.

    A multiplicative hash (Knuth's 2654435761) scatters neighbouring indices over the colour cube; every channel
    gets bit 6 set (at least 64) so that no region is black.
    """
    hashed = (tokens.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
    channels = [(hashed >> np.uint64(shift)) & np.uint64(255) for shift in (8, 16, 24)]
    return (np.stack(channels, axis=-1) | np.uint64(64)).astype(np.uint8)


def region_owners(affinity: Any, stride: int, size: tuple[int, int]) -> np.ndarray:
    """The token that owns each pixel: the argmax of its affinities over the 9 neighbours.

    Args:
        affinity: (9, h, w, Hg, Wg) (or (1, 9, h, w, Hg, Wg)) affinities, a torch tensor or an array.
        stride: the backbone's patch stride; the sub-pixel map is resized nearest to (Hg x stride, Wg x stride).
        size: (H, W) of the image; the model padded it bottom/right to the stride, so the map is cropped to it.

    Returns:
        (H, W) int64 token indices ``y * Wg + x``.
    """
    if isinstance(affinity, torch.Tensor):
        affinity = affinity.detach().float().cpu().numpy()
    affinity = np.asarray(affinity)
    if affinity.ndim == 6 and affinity.shape[0] == 1:
        affinity = affinity[0]
    if affinity.ndim != 5 or affinity.shape[0] != 9:
        raise ValueError(f"affinity must have shape (9, h, w, Hg, Wg), got {affinity.shape}")
    _, sub_h, sub_w, grid_h, grid_w = affinity.shape
    height, width = size
    if height > grid_h * stride or width > grid_w * stride:
        raise ValueError(f"a {grid_h}x{grid_w} token grid at stride {stride} cannot cover a {height}x{width} image")
    neighbour = affinity.argmax(axis=0)  # (h, w, Hg, Wg)
    token_y = np.arange(grid_h)[None, None, :, None] + neighbour // 3 - 1
    token_x = np.arange(grid_w)[None, None, None, :] + neighbour % 3 - 1
    # Out-of-grid neighbours have affinity 0 and never win unless a pixel's affinities are all equal; clip anyway.
    owner = np.clip(token_y, 0, grid_h - 1) * grid_w + np.clip(token_x, 0, grid_w - 1)
    owner = owner.transpose(2, 0, 3, 1).reshape(grid_h * sub_h, grid_w * sub_w)  # pixel (y*h + i, x*w + j)
    # Nearest resize as F.interpolate(mode="nearest") does it: source = floor(dst * in / out).
    rows = np.arange(height) * owner.shape[0] // (grid_h * stride)
    cols = np.arange(width) * owner.shape[1] // (grid_w * stride)
    return owner[rows[:, None], cols[None, :]]


def region_boundaries(owners: np.ndarray) -> np.ndarray:
    """(H, W) bool: True where a pixel's owner differs from its right or lower neighbour's."""
    edges = np.zeros(owners.shape, dtype=bool)
    edges[:, :-1] |= owners[:, :-1] != owners[:, 1:]
    edges[:-1, :] |= owners[:-1, :] != owners[1:, :]
    return edges


def region_map(image: np.ndarray, affinity: Any, stride: int) -> np.ndarray:
    """The paper's picture of learned regions (Figures 6 and 8): each token's region in its own colour.

    Every pixel belongs to the token it has the highest affinity with; regions are tinted over the photo
    (weight 0.45) with a colour derived from the token index, and their boundaries drawn in white.

    Args:
        image: (H, W, 3) uint8 RGB, the image the model saw (before padding to the stride).
        affinity: (9, h, w, Hg, Wg) affinities from ``model.forward_all(x).affinity[0]``.
        stride: the backbone's patch stride (16 or 32).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    owners = region_owners(affinity, stride, image.shape[:2])
    picture = _blend(image, token_colours(owners), REGION_ALPHA)
    picture[region_boundaries(owners)] = _BOUNDARY
    return picture


@torch.inference_mode()
def predict_regions(model: nn.Module, image: np.ndarray, *, scale: float = 1.0) -> np.ndarray:
    """The learned regions (paper Figs. 6 and 8) drawn over the image, at the image's size."""
    if not hasattr(model, "head"):
        raise RegproxyError("--regions needs a RegProxy model; the linear baseline has no regions")
    config = model.config
    height, width = image.shape[:2]
    size = working_size(height, width, config, scale)
    small = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    x = normalise(small, config, device_of(model))
    affinity = model.forward_all(x).affinity[0].float().cpu()
    picture = region_map(small, affinity, model.backbone.stride)
    if size != (height, width):
        picture = np.asarray(Image.fromarray(picture).resize((width, height), Image.NEAREST))
    return picture
