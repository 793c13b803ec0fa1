"""Pictures of what a model does: colour overlays of label maps, the learned regions as the paper draws them
(Figures 6 and 8: region boundaries as thin lines over the image, regions tinted by their token's class) and heat
maps of how sure a segmentation is.

Every public picture function takes an (H, W, 3) uint8 RGB image (or (H, W) values) and returns an (H, W, 3) uint8
RGB array of the same size."""

from __future__ import annotations

import colorsys
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regproxy_cli.errors import RegproxyError
from regproxy_cli.images import palette_array
from regproxy_cli.inference.confidence import ConfidenceMaps
from regproxy_cli.inference.predictor import device_of, normalise
from regproxy_cli.inference.protocol import TestProtocol

REGION_ALPHA = 0.4  # how strongly region colours tint the photo in region_map
LINE_EVERY = 1000  # region lines are one pixel wide, plus one per this many pixels of the picture's longer side
REGION_MODES = ("class", "token", "prototype")


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


# ---------------------------------------------------------------------------------------------------------------
# Heat maps

# Eleven evenly spaced colours of viridis (van der Walt and Smith's perceptually uniform colour map, public domain):
# lightness rises steadily from dark violet to yellow and stays readable in grey and for colour-blind readers.
_VIRIDIS_ANCHORS = np.array([
    (0x44, 0x01, 0x54), (0x48, 0x24, 0x75), (0x41, 0x44, 0x87), (0x35, 0x5F, 0x8D), (0x2A, 0x78, 0x8E),
    (0x21, 0x91, 0x8C), (0x22, 0xA8, 0x84), (0x44, 0xBF, 0x70), (0x7A, 0xD1, 0x51), (0xBD, 0xDF, 0x26),
    (0xFD, 0xE7, 0x25),
], dtype=np.float64)


def colormap_lut(entries: int = 256) -> np.ndarray:
    """(entries, 3) uint8: the viridis anchors interpolated linearly, entry 0 for the lowest value."""
    positions = np.linspace(0, len(_VIRIDIS_ANCHORS) - 1, entries)
    low = np.floor(positions).astype(int).clip(0, len(_VIRIDIS_ANCHORS) - 2)
    frac = (positions - low)[:, None]
    colours = (1 - frac) * _VIRIDIS_ANCHORS[low] + frac * _VIRIDIS_ANCHORS[low + 1]
    return np.rint(colours).astype(np.uint8)


COLORMAP = colormap_lut()


def heatmap(values: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """(H, W) values to an (H, W, 3) uint8 picture in :data:`COLORMAP`: ``low`` and below dark violet, ``high`` and
    above yellow, linear in between (a fixed scale, so pictures of different images compare). NaN is black."""
    if not high > low:
        raise ValueError(f"high must be above low, got {low}..{high}")
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"values must have shape (H, W), got {values.shape}")
    position = np.nan_to_num((values - low) / (high - low), nan=0.0).clip(0, 1)
    picture = COLORMAP[np.rint(position * (len(COLORMAP) - 1)).astype(np.intp)]
    picture[np.isnan(values)] = 0
    return picture


def confidence_pictures(maps: ConfidenceMaps, num_classes: int) -> dict[str, np.ndarray]:
    """Heat maps of :func:`~regproxy_cli.inference.confidence.predict_confidence`'s maps, each on a fixed scale:
    ``maxprob`` (the top class probability, 0 to 1), ``entropy`` (0 to ln K nats, i.e. divided by its maximum) and,
    with TTA, ``disagreement`` (the fraction of augmented views that disagree, 0 to 1). Bright is high."""
    pictures = {"maxprob": heatmap(maps.max_prob, 0.0, 1.0),
                "entropy": heatmap(maps.entropy, 0.0, max(math.log(num_classes), 1e-6))}
    if maps.disagreement is not None:
        pictures["disagreement"] = heatmap(maps.disagreement, 0.0, 1.0)
    return pictures


# ---------------------------------------------------------------------------------------------------------------
# Learned regions


def _token_palette() -> np.ndarray:
    """16 colours for the tokens of a 4 x 4 tile: 8 hues 45 degrees apart, two brightnesses."""
    colours = []
    for row in range(4):
        for col in range(4):
            hue = (2 * col + row % 2) / 8  # horizontal neighbours 90 degrees apart, vertical ones 45
            value = 1.0 if row < 2 else 0.7
            colours.append(colorsys.hsv_to_rgb(hue, 0.75, value))
    return np.rint(np.array(colours) * 255).astype(np.uint8)


_TOKEN_PALETTE = _token_palette()


def token_colours(tokens: np.ndarray, grid_width: int) -> np.ndarray:
    """Colours of token indices ``y * grid_width + x``: (...,) int to (..., 3) uint8.

    Token (y, x) gets colour ``(y mod 4, x mod 4)`` of a 16-colour tile. Two pixels next to each other belong to
    tokens at most 3 apart on either axis (each pixel's token is within one cell of its own cell), so two regions
    that touch never share a colour, and the picture has no random speckle.
    """
    tokens = np.asarray(tokens)
    return _TOKEN_PALETTE[(tokens // grid_width % 4) * 4 + tokens % grid_width % 4]


def affinity_layout(affinity: Any) -> np.ndarray:
    """Affinities as pictures: (9, h, w, Hg, Wg) (or with a leading batch of 1; a tensor or an array) to a
    (9, Hg*h, Wg*w) float32 array, sub-pixel (i, j) of token (y, x) at row ``y*h + i``, column ``x*w + j``: the
    padded frame the model saw, at its output stride."""
    if isinstance(affinity, torch.Tensor):
        affinity = affinity.detach().float().cpu().numpy()
    affinity = np.asarray(affinity, dtype=np.float32)
    if affinity.ndim == 6 and affinity.shape[0] == 1:
        affinity = affinity[0]
    if affinity.ndim != 5 or affinity.shape[0] != 9:
        raise ValueError(f"affinity must have shape (9, h, w, Hg, Wg), got {affinity.shape}")
    _, sub_h, sub_w, grid_h, grid_w = affinity.shape
    return affinity.transpose(0, 3, 1, 4, 2).reshape(9, grid_h * sub_h, grid_w * sub_w)


def _cells_of_pixels(cells: int, frame: int, size: int, out: int) -> np.ndarray:
    """Along one axis: for each of ``out`` picture pixels, the cell (of ``cells`` equal cells covering ``frame``
    pixels of the model's input) under its centre, when the picture spans the input's first ``size`` pixels.
    Nearest-neighbour, as ``F.interpolate(mode="nearest")`` when ``out == size``."""
    source = np.minimum(((np.arange(out) + 0.5) * (size / out)).astype(np.int64), size - 1)
    return source * cells // frame


def cells_to_pixels(cells: np.ndarray, frame: tuple[int, int], size: tuple[int, int],
                    out_size: tuple[int, int] | None = None) -> np.ndarray:
    """Values on a grid of cells covering the model's padded input ``frame`` (..., R, C) to the picture's pixels.

    Args:
        cells: (..., R, C) values, e.g. one per sub-pixel of the output stride.
        frame: (Fh, Fw), the padded input the cells cover (token grid x stride).
        size: (H, W), the part of the frame that is the image the model saw (top left).
        out_size: the picture's (Ho, Wo) (default ``size``): the image at another resolution, e.g. the original
            photo when the model saw it at its test scale.

    Returns:
        (..., Ho, Wo): each pixel takes the value of the cell under its centre.
    """
    height, width = size
    if height > frame[0] or width > frame[1]:
        raise ValueError(f"a {frame[0]}x{frame[1]} frame cannot hold a {height}x{width} image")
    out_h, out_w = out_size or size
    rows = _cells_of_pixels(cells.shape[-2], frame[0], height, out_h)
    cols = _cells_of_pixels(cells.shape[-1], frame[1], width, out_w)
    return cells[..., rows[:, None], cols[None, :]]


def region_owners(affinity: Any, stride: int, size: tuple[int, int],
                  out_size: tuple[int, int] | None = None) -> np.ndarray:
    """The token that owns each pixel: the argmax of its affinities over the 9 neighbours.

    Args:
        affinity: (9, h, w, Hg, Wg) (or (1, 9, h, w, Hg, Wg)) affinities, a torch tensor or an array.
        stride: the backbone's patch stride; the token grid covers (Hg x stride, Wg x stride) pixels.
        size: (H, W) of the image the model saw; the model padded it bottom/right to the stride.
        out_size: the size of the picture to draw (default ``size``): each pixel takes the owner of the model's
            sub-pixel under its centre.

    Returns:
        (Ho, Wo) int64 token indices ``y * Wg + x``.
    """
    layout = affinity_layout(affinity)
    grid_h, grid_w = np.shape(affinity)[-2:]
    _, rows, cols = layout.shape
    sub_h, sub_w = rows // grid_h, cols // grid_w
    neighbour = layout.argmax(axis=0)  # (Hg*h, Wg*w)
    token_y = (np.arange(rows) // sub_h)[:, None] + neighbour // 3 - 1
    token_x = (np.arange(cols) // sub_w)[None, :] + neighbour % 3 - 1
    # Out-of-grid neighbours have affinity 0 and never win unless a pixel's affinities are all equal; clip anyway.
    owner = np.clip(token_y, 0, grid_h - 1) * grid_w + np.clip(token_x, 0, grid_w - 1)
    return cells_to_pixels(owner, (grid_h * stride, grid_w * stride), size, out_size)


def region_boundaries(owners: np.ndarray) -> np.ndarray:
    """(H, W) bool: True where a pixel's owner differs from its right or lower neighbour's."""
    edges = np.zeros(owners.shape, dtype=bool)
    edges[:, :-1] |= owners[:, :-1] != owners[:, 1:]
    edges[:-1, :] |= owners[:-1, :] != owners[1:, :]
    return edges


def line_width(size: tuple[int, int]) -> int:
    """Region lines' width in pixels for a picture of ``size``: 1 up to 1500 pixels on the longer side, then one
    more per 1000, so that they stay visible when a large picture is shown shrunk to a screen."""
    return max(1, round(max(size) / LINE_EVERY))


def thicken(mask: np.ndarray, width: int) -> np.ndarray:
    """A boolean mask grown to lines ``width`` pixels wide: each True pixel becomes a ``width`` x ``width`` square
    (``(width - 1) // 2`` pixels up and left, the rest down and right)."""
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    grown = mask.copy()
    for axis in (0, 1):
        source = grown.copy()
        for shift in range(-((width - 1) // 2), width // 2 + 1):
            if shift:
                moved = np.roll(source, shift, axis=axis)
                # np.roll wraps around: clear what came in from the other side
                edge = [slice(None), slice(None)]
                edge[axis] = slice(0, shift) if shift > 0 else slice(shift, None)
                moved[tuple(edge)] = False
                grown |= moved
    return grown


def line_colours(picture: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours that stand out against ``picture``: white over dark pixels, black over light ones
    (Rec. 601 luma below or above 140)."""
    luma = picture.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.where((luma < 140)[..., None], np.uint8(255), np.uint8(0)).repeat(3, axis=-1).astype(np.uint8)


def region_map(
    image: np.ndarray,
    affinity: Any,
    stride: int,
    *,
    size: tuple[int, int] | None = None,
    by: str = "token",
    token_classes: np.ndarray | None = None,
    palette: Any = None,
    width: int | None = None,
    alpha: float = REGION_ALPHA,
) -> np.ndarray:
    """The learned regions as the paper draws them (Figures 6 and 8), at the image's own resolution.

    Every pixel belongs to the token it has the highest affinity with (:func:`region_owners`); region boundaries
    are drawn as lines ``width`` pixels wide (default :func:`line_width`), white over dark parts of the picture and
    black over light ones, and each region is tinted (weight ``alpha``) with its token's predicted class colour
    (``by="class"``) or with a token colour that differs from every touching region's (``by="token"``,
    :func:`token_colours`).

    Args:
        image: (H, W, 3) uint8 RGB, drawn at its size.
        affinity: (9, h, w, Hg, Wg) affinities from ``model.forward_all(x).affinity[0]``.
        stride: the backbone's patch stride (16 or 32).
        size: the size of the image the model saw (default the image's): a picture of the original photo when
            the model ran at its test scale.
        by: ``"class"`` or ``"token"``.
        token_classes: (Hg, Wg) or (Hg*Wg,) class ids of the tokens, for ``by="class"``.
        palette: (K, 3) class colours, for ``by="class"``.
        width: line width in pixels.
        alpha: weight of the region colours over the photo.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if by not in ("class", "token"):
        raise ValueError(f"by must be class or token, got {by!r}")
    out_size = image.shape[:2]
    owners = region_owners(affinity, stride, size or out_size, out_size)
    grid_w = np.shape(affinity)[-1]
    if by == "class":
        if token_classes is None or palette is None:
            raise ValueError("by='class' needs the tokens' classes and a palette")
        fill = colorize(np.asarray(token_classes).reshape(-1)[owners], palette)
    else:
        fill = token_colours(owners, grid_w)
    picture = _blend(image, fill, alpha)
    lines = thicken(region_boundaries(owners), width or line_width(out_size))
    picture[lines] = line_colours(picture)[lines]
    return picture


@torch.inference_mode()
def predict_regions(model: nn.Module, image: np.ndarray, *, scale: float = 1.0, by: str = "class",
                    width: int | None = None) -> np.ndarray:
    """The learned regions of ``model`` on an (H, W, 3) uint8 RGB image, drawn over it at its size
    (:func:`region_map`). The model sees the image whole at its test scale (times ``scale``); ``by="class"`` tints
    each region with the colour of its token's predicted class, ``by="token"`` with a colour per token."""
    if not model.has_regions:
        raise RegproxyError("--regions needs a RegProxy model; the linear baseline has no regions")
    if by not in REGION_MODES:
        raise RegproxyError(f"regions by must be one of {', '.join(REGION_MODES)}, got {by!r}")
    if by == "prototype" and getattr(model.token_classifier, "nearest_prototype", None) is None:  # optional method
        raise RegproxyError(f"regions by prototype needs a model with prototypes (model.classifier: protoseg); this "
                            f"one's classifier is {model.config.classifier}")
    config = model.config
    image = np.asarray(image)
    height, width_px = image.shape[:2]
    size = TestProtocol.from_config(config, scale=scale).working_size(height, width_px)
    x = normalise(image, config, device_of(model))
    if size != (height, width_px):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    output = model.forward_all(x)
    token_classes = output.token_logits[0].argmax(0).cpu().numpy()
    palette = config.palette
    if by == "prototype":  # regions in the shade of the prototype their token matched within its class
        classifier = model.token_classifier
        token_classes = classifier.nearest_prototype(output.tokens[0].permute(1, 2, 0)).cpu().numpy()
        palette, by = classifier.prototype_palette(config.palette), "class"
    return region_map(image, output.affinity[0], model.backbone.stride, size=size, by=by, token_classes=token_classes,
                      palette=palette, width=width)
