"""Images in and out: loading any photo as RGB uint8, atomic PNG writes, label maps, colour overlays, and the
paper's picture of learned regions (Figures 6 and 8).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from regproxy_cli.errors import RegproxyError
from regproxy_cli.files import write_atomic

# What PIL raises on unreadable files: UnidentifiedImageError (an OSError) for non-images, OSError for truncated
# data and I/O failures, SyntaxError/ValueError/EOFError from some decoders on corrupt data, and
# DecompressionBombError for images over Image.MAX_IMAGE_PIXELS.
_READ_ERRORS = (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError)

REGION_ALPHA = 0.45  # how strongly region colours cover the photo in region_map
_BOUNDARY = np.array([255, 255, 255], dtype=np.uint8)


def _one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line, or its type name when it has none."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA to (H, W, 3) RGB: colour x alpha, i.e. alpha-composited over a black background."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def _integer_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16- or 32-bit grey levels to 0-255 by their bit depth (dropping the low bits), clipping negatives."""
    values = np.clip(values.astype(np.int64), 0, None)
    if mode.startswith("I;16") or values.max(initial=0) <= 0xFFFF:
        # Pillow opens some 16-bit PNGs and TIFFs as 32-bit mode "I"; values that fit in 16 bits are read as such.
        return (np.minimum(values, 0xFFFF) >> 8).astype(np.uint8)
    return (np.minimum(values, 0x7FFFFFFF) >> 23).astype(np.uint8)  # non-negative int32: 31 bits


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an (H, W, 3) uint8 RGB array."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("L", "1"):
        grey = np.asarray(image.convert("L"), dtype=np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode.startswith("I"):
        grey = _integer_to_uint8(np.asarray(image), mode)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        grey = np.asarray(image, dtype=np.float32)
        grey = np.rint(np.clip(np.nan_to_num(grey), 0, 255)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        return _composite_on_black(np.asarray(image.convert("RGBA"), dtype=np.uint8))
    # P without transparency, CMYK (PIL's plain inversion, no colour profile), YCbCr, HSV, ...
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Load an image file as RGB, upright as the camera's EXIF orientation says.

    Every PIL mode becomes 8-bit RGB: grey levels are repeated over the three channels, palettes are expanded,
    images with an alpha channel (RGBA, LA, palette transparency) are alpha-composited over black, CMYK uses
    PIL's conversion, 16-bit and 32-bit integer images are scaled down by their bit depth (16-bit: value >> 8),
    float images are clipped to 0-255. Multi-frame files give their first frame.

    Args:
        path: the image file.

    Returns:
        (H, W, 3) uint8 RGB array.

    Raises:
        RegproxyError: the file is missing, is a directory, or is not a readable image.
    """
    path = Path(path)
    if path.is_dir():
        raise RegproxyError(f"{path}: is a directory, not an image")
    if not path.exists():
        raise RegproxyError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # also forces the full decode, so truncation surfaces here
            return _to_rgb_array(image)
    except UnidentifiedImageError:
        raise RegproxyError(f"{path}: not an image PIL can read") from None
    except _READ_ERRORS as error:
        raise RegproxyError(f"{path}: cannot read the image ({_one_line(error)})") from None


def _to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    """A PIL image from an (H, W), (H, W, 3) or (H, W, 4) uint8 array (or uint16 (H, W)), or the image itself."""
    if isinstance(image, Image.Image):
        return image
    array = np.ascontiguousarray(image)
    if array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(array)  # mode I;16, written as 16-bit grey PNG
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"cannot save an array of shape {array.shape} and dtype {array.dtype} as PNG")
    return Image.fromarray(array)


def save_png_atomic(path: str | os.PathLike[str], image: np.ndarray | Image.Image) -> None:
    """Write a PNG so that ``path`` is either the old file or the complete new one, never a partial write.

    The PNG goes to a temporary file in the same directory (same file system, so the rename is atomic) and is
    then moved over ``path`` with ``os.replace``.

    Args:
        path: the destination; its directory must exist.
        image: a PIL image, or an (H, W) / (H, W, 3) / (H, W, 4) uint8 array, or an (H, W) uint16 array.

    Raises:
        RegproxyError: the file cannot be written (missing directory, permissions, full disk).
    """
    picture = _to_pil(image)
    try:
        write_atomic(path, lambda temp_name: picture.save(temp_name, format="PNG"))
    except OSError as error:
        raise RegproxyError(f"{path}: cannot write ({_one_line(error)})") from None


def _palette_array(palette: Any) -> np.ndarray:
    """(K, 3) uint8 array from a palette given as a sequence of (r, g, b) or an array."""
    colours = np.asarray(palette)
    if colours.ndim != 2 or colours.shape[1] != 3 or colours.shape[0] < 1:
        raise ValueError(f"a palette must have shape (K, 3), got {colours.shape}")
    if colours.min() < 0 or colours.max() > 255:
        raise ValueError("palette colours must be in 0..255")
    return colours.astype(np.uint8)


def save_label_png(path: str | os.PathLike[str], labels: np.ndarray, palette: Any) -> None:
    """Save a label map as a PNG whose pixel values are the class ids, atomically.

    Up to 256 classes: an 8-bit palette ('P') PNG that image viewers show in the class colours while the stored
    values stay the ids. More classes: a 16-bit greyscale PNG of the ids (no colours).

    Args:
        path: the destination PNG.
        labels: (H, W) integer class ids.
        palette: (K, 3) uint8 colours, one per class; K decides the format.

    Raises:
        ValueError: ids are negative or do not fit the format.
        RegproxyError: the file cannot be written.
    """
    colours = _palette_array(palette)
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got shape {labels.shape} and dtype {labels.dtype}")
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    limit = 256 if len(colours) <= 256 else 65536
    if low < 0 or high >= limit:
        raise ValueError(f"label ids must be in 0..{limit - 1} for {len(colours)} classes, got {low}..{high}")
    if limit == 256:
        picture = Image.fromarray(labels.astype(np.uint8))  # mode L; putpalette makes it P, keeping the values
        # Pad to 256 entries: ids at or above K (e.g. 255 = ignore) are then black rather than undefined.
        full = np.zeros((256, 3), dtype=np.uint8)
        full[: len(colours)] = colours
        picture.putpalette(full.tobytes())
    else:
        picture = Image.fromarray(labels.astype(np.uint16))
    save_png_atomic(path, picture)


def colorize(labels: np.ndarray, palette: Any) -> np.ndarray:
    """(H, W) class ids to an (H, W, 3) uint8 image in the palette's colours.

    Raises:
        ValueError: an id is negative or has no colour.
    """
    colours = _palette_array(palette)
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
    if hasattr(affinity, "detach"):  # a torch tensor, without importing torch here
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
