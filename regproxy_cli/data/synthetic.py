"""Synthetic scenes for an offline demo: small images a tiny RegProxy learns in minutes on a CPU.

Each scene has a textured background (class 0) and objects of the other classes, cycling through five kinds:
ellipses with wobbly outlines, blobs cut from low-frequency noise, thin lines and poles 2-4 px wide, rings, and
rotated boxes. Every class has its own base colour and stripe texture, jittered per image, under a per-image
colour cast and pixel noise: colour helps but does not decide a pixel alone, and the thin structures and
curved boundaries exercise what the region proxies are for (sub-token detail, shapes that follow no grid).

Scenes are a pure function of (seed, split, index), so the same arguments always give the same pixels.
:func:`write_synthetic_dataset` saves them in the :class:`~regproxy_cli.data.datasets.FolderDataset` format,
so training and evaluation treat them exactly like user data.
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from torch.utils.data import Dataset

from regproxy_cli.errors import RegproxyError

KINDS = ("ellipse", "blob", "line", "ring", "box")
# Painting order: large regions first, thin structures last so they stay thin and unbroken.
_LAYER = {"blob": 0, "box": 1, "ellipse": 2, "ring": 3, "line": 4}
_BACKGROUND_RGB = (112, 108, 98)
_MARKER = "synthetic.yaml"


def synthetic_classes(num_classes: int) -> tuple[list[str], list[str], list[tuple[int, int, int]]]:
    """Names, kinds and base colours of the classes of a synthetic dataset.

    Args:
        num_classes: 2 or more; class 0 is the background, class c >= 1 has kind ``KINDS[(c - 1) % 5]``.

    Returns:
        (names, kinds, colours): names like ``ellipse`` or ``ellipse-2`` when a kind repeats; RGB base colours,
        grey-brown for the background and evenly spaced hues for the others.
    """
    if num_classes < 2:
        raise RegproxyError(f"a synthetic dataset needs at least 2 classes, got {num_classes}")
    names, kinds, colours = ["background"], ["background"], [_BACKGROUND_RGB]
    for c in range(1, num_classes):
        kind = KINDS[(c - 1) % len(KINDS)]
        repeat = (c - 1) // len(KINDS)
        names.append(kind if repeat == 0 else f"{kind}-{repeat + 1}")
        kinds.append(kind)
        r, g, b = colorsys.hsv_to_rgb((c - 1) / (num_classes - 1), 0.65, 0.8)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return names, kinds, colours


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise: a cells x cells grid of normals upsampled bicubically to size (H, W)."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size[1], size[0]), Image.BICUBIC))


def _rotated(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates relative to (cy, cx), rotated by ``angle`` (radians)."""
    dy, dx = yy - cy, xx - cx
    cos, sin = np.cos(angle), np.sin(angle)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def _ellipse(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    height, width = yy.shape
    side = min(height, width)
    u, v = _rotated(yy, xx, rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0, np.pi))
    a, b = rng.uniform(0.08, 0.22, size=2) * side
    # A gentle wobble of the radius makes outlines that are curved but not perfect conics.
    wobble = 1 + 0.12 * np.sin(rng.integers(2, 5) * np.arctan2(v, u) + rng.uniform(0, 2 * np.pi))
    return (u / a) ** 2 + (v / b) ** 2 <= wobble**2


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    noise = _smooth_noise(rng, yy.shape, int(rng.integers(3, 6)))
    return noise > np.quantile(noise, rng.uniform(0.78, 0.9))


def _ring(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    height, width = yy.shape
    radius = np.hypot(yy - rng.uniform(0, height), xx - rng.uniform(0, width))
    outer = rng.uniform(0.1, 0.2) * min(height, width)
    thickness = max(3.0, rng.uniform(0.3, 0.5) * outer)
    return (radius <= outer) & (radius > outer - thickness)


def _box(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    height, width = yy.shape
    u, v = _rotated(yy, xx, rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0, np.pi))
    a, b = rng.uniform(0.05, 0.18, size=2) * min(height, width)
    return (np.abs(u) <= a) & (np.abs(v) <= b)


def _lines(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, widths: tuple[int, int] = (2, 4)) -> np.ndarray:
    """Poles (near-vertical) and wires (any angle), each a segment ``widths[0]`` to ``widths[1]`` px wide."""
    height, width = yy.shape
    mask = np.zeros(yy.shape, dtype=bool)
    for _ in range(int(rng.integers(2, 5))):
        if rng.random() < 0.5:  # a pole standing on the lower part of the image
            x0 = rng.uniform(0, width)
            p0 = np.array([rng.uniform(0.55, 1.0) * height, x0])
            p1 = np.array([rng.uniform(0.0, 0.4) * height, x0 + rng.uniform(-0.05, 0.05) * width])
        else:
            p0 = rng.uniform(0, 1, size=2) * (height, width)
            p1 = rng.uniform(0, 1, size=2) * (height, width)
        half = int(rng.integers(widths[0], widths[1] + 1)) / 2
        direction = p1 - p0
        length2 = max(float(direction @ direction), 1e-6)
        t = np.clip(((yy - p0[0]) * direction[0] + (xx - p0[1]) * direction[1]) / length2, 0, 1)
        distance = np.hypot(yy - (p0[0] + t * direction[0]), xx - (p0[1] + t * direction[1]))
        # Strictly less than half the width: at most `width` pixel centres across the line.
        mask |= distance < half
    return mask


_SHAPES: dict[str, Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]] = {
    "ellipse": _ellipse, "blob": _blob, "line": _lines, "ring": _ring, "box": _box,
}


def render_scene(rng: np.random.Generator, size: tuple[int, int], kinds: list[str],
                 colours: list[tuple[int, int, int]], line_width: tuple[int, int] = (2, 4)
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene.

    Args:
        rng: the scene's random source.
        size: (height, width).
        kinds: kind of every class (see :func:`synthetic_classes`).
        colours: base RGB colour of every class.
        line_width: smallest and largest width of thin structures, in pixels.

    Returns:
        (image, label): RGB uint8 HxWx3 and uint8 HxW class ids.
    """
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    label = np.zeros(size, dtype=np.uint8)
    # Background: its base colour varies a lot between images, with soft shading across the scene.
    background = np.array(colours[0], dtype=np.float32) + rng.uniform(-35, 35, size=3)
    image = background + 25 * _smooth_noise(rng, size, 4)[..., None]
    image = np.broadcast_to(image, (height, width, 3)).copy()
    shapes = {**_SHAPES, "line": partial(_lines, widths=line_width)}
    order = sorted(range(1, len(kinds)), key=lambda c: (_LAYER[kinds[c]], c))
    for c in order:
        if rng.random() > 0.85:  # some classes are absent, so the model must not assume every class is there
            continue
        mask = np.zeros(size, dtype=bool)
        for _ in range(int(rng.integers(1, 3))):
            mask |= shapes[kinds[c]](rng, yy, xx)
        colour = np.array(colours[c], dtype=np.float32) + rng.uniform(-18, 18, size=3)
        # Stripes whose frequency depends on the class and whose angle and phase depend on the image.
        frequency = 0.06 + 0.05 * ((3 * c) % 5) / 4
        u, _ = _rotated(yy, xx, 0, 0, rng.uniform(0, np.pi))
        stripes = 18 * np.sin(2 * np.pi * frequency * u + rng.uniform(0, 2 * np.pi))
        image[mask] = colour + stripes[mask][:, None]
        label[mask] = c
    cast = rng.uniform(0.88, 1.12, size=3) * rng.uniform(0.85, 1.15)  # per-image white balance and exposure
    image = image * cast + rng.normal(0, 9, size=(height, width, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


class SyntheticScenes(Dataset):
    """A deterministic dataset of synthetic scenes, yielding ``(image, label, name)`` like the real datasets.

    Args:
        num_images: dataset length.
        size: (height, width) of every image.
        num_classes: number of classes, background included (at least 2).
        seed: base seed; with ``split`` and the index it fixes every scene.
        split: names an independent stream of scenes, so ``train`` and ``val`` never share an image.
        line_width: smallest and largest width of the thin structures, in pixels (the difficulty knob: thinner
            lines are harder to resolve at output stride 4).
        transform: optional callable applied to ``(image, label)``.
    """

    def __init__(self, num_images: int, size: tuple[int, int] = (128, 128), num_classes: int = 5, seed: int = 0,
                 split: str = "train", line_width: tuple[int, int] = (2, 4), transform: Callable | None = None) -> None:
        if min(size) < 16:
            raise RegproxyError(f"synthetic images must be at least 16x16, got {size[1]}x{size[0]}")
        if not 1 <= line_width[0] <= line_width[1]:
            raise RegproxyError(f"line widths must satisfy 1 <= smallest <= largest, got {line_width}")
        self.line_width = (int(line_width[0]), int(line_width[1]))
        self.num_images = num_images
        self.size = (int(size[0]), int(size[1]))
        self.seed = seed
        self.split = split
        self.transform = transform
        names, self.kinds, colours = synthetic_classes(num_classes)
        self.classes = tuple(names)
        self.palette = tuple(colours)
        self._stream = zlib.crc32(split.encode())  # stable across runs, unlike hash()

    @property
    def num_classes(self) -> int:
        """How many classes the labels use, background included."""
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_images

    def name(self, index: int) -> str:
        """The sample's name, also its file stem when written to disk."""
        return f"{self.split}_{index:05d}"

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, label) of scene ``index``, without the transform."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"scene {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, self._stream, index])
        return render_scene(rng, self.size, self.kinds, list(self.palette), self.line_width)

    def __getitem__(self, index: int) -> tuple[Any, Any, str]:
        image, label = self.render(index)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label, self.name(index)


def write_synthetic_dataset(root: str | Path, num_train: int = 200, num_val: int = 50,
                            size: tuple[int, int] = (128, 128), num_classes: int = 5, seed: int = 0,
                            line_width: tuple[int, int] = (2, 4)) -> Path:
    """Write synthetic scenes in the FolderDataset format: ``classes.yaml``, ``images/{train,val}/*.png``,
    ``masks/{train,val}/*.png``.

    Writing is skipped when ``root`` already holds a dataset written with the same arguments (the
    ``synthetic.yaml`` marker, written last, records them), so a re-run of the demo reuses it.

    Args:
        root: output directory; must be empty or absent unless it holds the same synthetic dataset.
        num_train: number of training scenes.
        num_val: number of validation scenes.
        size: (height, width) of every scene.
        num_classes: number of classes, background included.
        seed: base seed.
        line_width: smallest and largest width of the thin structures, in pixels.

    Returns:
        ``root`` as a Path.

    Raises:
        RegproxyError: if ``root`` holds anything else.
    """
    root = Path(root)
    params = {"num_train": num_train, "num_val": num_val, "size": [int(size[0]), int(size[1])],
              "num_classes": num_classes, "seed": seed, "line_width": [int(line_width[0]), int(line_width[1])]}
    marker = root / _MARKER
    if marker.is_file() and yaml.safe_load(marker.read_text()) == params:
        return root
    if root.exists() and any(root.iterdir()):
        raise RegproxyError(f"{root} is not empty and holds no synthetic dataset made with these settings; "
                            "choose a new directory or remove it")
    names, _, colours = synthetic_classes(num_classes)
    flat_palette = [v for colour in colours for v in colour]
    for split, count in (("train", num_train), ("val", num_val)):
        scenes = SyntheticScenes(count, size, num_classes, seed, split, line_width)
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, label = scenes.render(index)
            Image.fromarray(image).save(root / "images" / split / f"{scenes.name(index)}.png")
            mask = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
            mask.putpalette(flat_palette)  # a palette PNG: ids when read, colours when viewed
            mask.save(root / "masks" / split / f"{scenes.name(index)}.png")
    classes_yaml = {"classes": names, "palette": [list(c) for c in colours]}
    (root / "classes.yaml").write_text(yaml.safe_dump(classes_yaml, sort_keys=False))
    marker.write_text(yaml.safe_dump(params, sort_keys=False))
    return root
