"""Image files in and out: any photo as RGB uint8, atomic PNG writes, and label maps as palette PNGs."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from regproxy_cli.errors import RegproxyError, one_line
from regproxy_cli.files import write_atomic

# What PIL raises on unreadable files: UnidentifiedImageError (an OSError) for non-images, OSError for truncated
# data and I/O failures, SyntaxError/ValueError/EOFError from some decoders on corrupt data, and
# DecompressionBombError for images over Image.MAX_IMAGE_PIXELS.
READ_ERRORS = (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError)


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
    return _decode(path, path)


def decode_image(data: bytes, name: str | os.PathLike[str]) -> np.ndarray:
    """:func:`load_image` of a file's bytes, read elsewhere (Ray's read tasks, from a local folder or s3://);
    ``name`` names the file in the error line. Same array, same errors."""
    return _decode(io.BytesIO(data), name)


def _decode(source: Path | io.BytesIO, name: str | os.PathLike[str]) -> np.ndarray:
    try:
        with Image.open(source) as image:
            image = ImageOps.exif_transpose(image)  # also forces the full decode, so truncation surfaces here
            return _to_rgb_array(image)
    except UnidentifiedImageError:
        raise RegproxyError(f"{name}: not an image PIL can read") from None
    except READ_ERRORS as error:
        raise RegproxyError(f"{name}: cannot read the image ({one_line(error)})") from None


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
        raise RegproxyError(f"{path}: cannot write ({one_line(error)})") from None


def palette_array(palette: Any) -> np.ndarray:
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
    save_png_atomic(path, label_picture(labels, palette))


def label_png_bytes(labels: np.ndarray, palette: Any) -> bytes:
    """The bytes :func:`save_label_png` writes, in memory (a Parquet column of label maps)."""
    buffer = io.BytesIO()
    label_picture(labels, palette).save(buffer, format="PNG")
    return buffer.getvalue()


def label_picture(labels: np.ndarray, palette: Any) -> Image.Image:
    """The PIL image of :func:`save_label_png`: 8-bit palette up to 256 classes, 16-bit grey above."""
    colours = palette_array(palette)
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
    return picture
