"""Street-like synthetic scenes: a second generator, built independently of :mod:`regproxy_cli.data.synthetic`, for
checking that a quality claim is not an artefact of one generator.

A scene is a street seen from eye height: a sky with a vertical gradient and clouds above a horizon, ground below
it, a road that curves towards a vanishing point (with dashed markings), buildings (rectangles carrying a grid of
windows), trees and bushes (noisy blobs with a leafy speckle), poles 1-6 px wide (upright or slanted) and signs
3-7 px across, many of them smaller than a ViT token. Seven classes: sky, building, road, ground, vegetation,
pole, sign. Colours are drawn per image (weather, wall paint, foliage season) under a per-image exposure and
pixel noise, so no class has a fixed colour.

Every *thing* (building, tree, bush, pole, sign) is an instance with a declared width in pixels (pole stroke,
sign side, the smaller side of a building or tree box) and its visible pixels (after occlusion) as row-major
runs. :func:`write_streets_dataset` stores them beside each mask as ``instances/{split}/{stem}.json``, which
:func:`object_recall` and :func:`recall_by_width` read for per-object analysis (how much of each pole a model
finds, binned by width).

Scenes are a pure function of (seed, split, index).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch.utils.data import Dataset

from regproxy_cli.errors import RegproxyError
from regproxy_cli.files import write_text_atomic
from regproxy_cli.images import save_label_png, save_png_atomic

STREET_CLASSES = ("sky", "building", "road", "ground", "vegetation", "pole", "sign")
STREET_PALETTE = ((70, 130, 180), (70, 70, 70), (128, 64, 128), (152, 251, 152), (107, 142, 35), (153, 153, 153),
                  (220, 220, 0))  # display colours of the masks, Cityscapes-like
SKY, BUILDING, ROAD, GROUND, VEGETATION, POLE, SIGN = range(7)
POLE_WIDTHS = (1, 6)  # smallest and largest pole stroke, px
SIGN_SIZES = (3, 7)  # smallest and largest sign side, px
WIDTH_BINS = (1, 2, 3, 4, 6, 8)  # lower edges of the width bins of recall_by_width; the last is open
_MARKER = "streets.yaml"


# ---------------------------------------------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------------------------------------------


def _value_noise(rng: np.random.Generator, size: tuple[int, int], period: float) -> np.ndarray:
    """Smooth noise in [-1, 1] with features about ``period`` px apart: a random lattice, bilinearly interpolated."""
    height, width = size
    rows, cols = int(np.ceil(height / period)) + 2, int(np.ceil(width / period)) + 2
    lattice = rng.uniform(-1, 1, size=(rows, cols))
    y = (np.arange(height) + rng.uniform(0, period)) / period
    x = (np.arange(width) + rng.uniform(0, period)) / period
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep: no creases at lattice lines
    top = lattice[y0][:, x0] * (1 - fx) + lattice[y0][:, x0 + 1] * fx
    bottom = lattice[y0 + 1][:, x0] * (1 - fx) + lattice[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """An RGB colour (0-255 floats) from hue, saturation and value in [0, 1]."""
    i = int(h * 6) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return 255 * np.array(rgb)


class _Canvas:
    """The image, the class map and the instance map being painted, plus the instance declarations."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.image = np.zeros((*size, 3), dtype=np.float64)
        self.label = np.zeros(size, dtype=np.uint8)
        self.instance = np.zeros(size, dtype=np.int32)  # 0 = stuff (sky, road, ground)
        self.objects: list[dict[str, Any]] = []
        yy, xx = np.mgrid[0:size[0], 0:size[1]]
        self.yy, self.xx = yy + 0.5, xx + 0.5  # pixel centres

    def paint(self, mask: np.ndarray, cls: int, colour: np.ndarray, declaration: dict[str, Any] | None = None
              ) -> None:
        """Paint ``mask`` with per-pixel ``colour`` (H, W, 3 or 3); a declaration makes it a new instance."""
        self.image[mask] = colour[mask] if colour.ndim == 3 else colour
        self.label[mask] = cls
        if declaration is None:
            self.instance[mask] = 0
            return
        instance_id = len(self.objects) + 1
        self.instance[mask] = instance_id
        self.objects.append({"id": instance_id, "class": cls, "class_name": STREET_CLASSES[cls], **declaration})


def _sky(rng: np.random.Generator, canvas: _Canvas, horizon: float) -> str:
    weather = str(rng.choice(["clear", "overcast", "dusk"], p=[0.5, 0.3, 0.2]))
    top, bottom = {
        "clear": ((60, 115, 200), (175, 200, 230)),
        "overcast": ((140, 145, 155), (205, 205, 210)),
        "dusk": ((50, 60, 115), (235, 160, 105)),
    }[weather]
    top = np.array(top) + rng.uniform(-20, 20, 3)
    bottom = np.array(bottom) + rng.uniform(-20, 20, 3)
    t = np.clip(canvas.yy / max(horizon, 1.0), 0, 1)[..., None]
    clouds = np.clip(_value_noise(rng, canvas.size, rng.uniform(10, 30)), 0, 1)[..., None]
    colour = top * (1 - t) + bottom * t + rng.uniform(10, 60) * clouds
    canvas.paint(canvas.yy < horizon, SKY, colour)
    return weather


def _ground(rng: np.random.Generator, canvas: _Canvas, horizon: float) -> None:
    surface = rng.integers(3)
    base = [_hsv(rng.uniform(0.05, 0.12), rng.uniform(0.2, 0.45), rng.uniform(0.35, 0.6)),  # earth
            _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.08), rng.uniform(0.5, 0.75)),  # pavement
            _hsv(rng.uniform(0.16, 0.24), rng.uniform(0.25, 0.45), rng.uniform(0.3, 0.5))][surface]  # dry grass
    grain = rng.normal(0, 1, canvas.size)[..., None] * rng.uniform(6, 14)
    patches = _value_noise(rng, canvas.size, rng.uniform(6, 16))[..., None] * 15
    canvas.paint(canvas.yy >= horizon, GROUND, base + grain + patches)


def _buildings(rng: np.random.Generator, canvas: _Canvas, horizon: float) -> None:
    height, width = canvas.size
    for _ in range(int(rng.integers(2, 7))):
        box_w = rng.uniform(0.12, 0.4) * width
        x0 = rng.uniform(-0.1, 1.0) * width - box_w / 2
        bottom = horizon + rng.uniform(0.0, 0.08) * height
        top = bottom - rng.uniform(0.15, 0.6) * height
        mask = (canvas.xx >= x0) & (canvas.xx < x0 + box_w) & (canvas.yy >= top) & (canvas.yy < bottom)
        if not mask.any():
            continue
        if rng.random() < 0.6:  # brick, sandstone, plaster
            wall = _hsv(rng.uniform(0.0, 0.13), rng.uniform(0.2, 0.6), rng.uniform(0.35, 0.85))
        else:  # concrete and glass
            wall = _hsv(rng.uniform(0.5, 0.7), rng.uniform(0.0, 0.15), rng.uniform(0.3, 0.8))
        colour = wall + rng.normal(0, 5, (*canvas.size, 3))
        # Windows: a grid with its own period and pane size; each pane dark or lit.
        period_x, period_y = rng.integers(5, 12, size=2)
        pane_w, pane_h = rng.integers(2, period_x), rng.integers(2, period_y)
        col = np.floor((canvas.xx - x0) / period_x).astype(int)
        row = np.floor((canvas.yy - top) / period_y).astype(int)
        pane = ((canvas.xx - x0) % period_x >= (period_x - pane_w) / 2) & \
            ((canvas.xx - x0) % period_x < (period_x + pane_w) / 2) & \
            ((canvas.yy - top) % period_y >= 1) & ((canvas.yy - top) % period_y < 1 + pane_h) & \
            (canvas.yy < bottom - 2)
        lit = rng.random((int(row.max()) + 2, int(col.max()) + 2)) < rng.uniform(0.0, 0.4)
        lit_here = lit[np.clip(row, 0, None), np.clip(col, 0, None)]
        glass = np.where(lit_here[..., None], _hsv(0.13, 0.5, 0.9), _hsv(0.6, 0.35, rng.uniform(0.15, 0.35)))
        colour = np.where(pane[..., None], glass + rng.normal(0, 4, (*canvas.size, 3)), colour)
        sides = (min(box_w, width), bottom - max(top, 0))
        canvas.paint(mask, BUILDING, colour, {"kind": "building", "width_px": round(min(sides))})


def _road(rng: np.random.Generator, canvas: _Canvas, horizon: float) -> None:
    height, width = canvas.size
    vanish_x = rng.uniform(0.25, 0.75) * width
    bottom_x = rng.uniform(0.2, 0.8) * width
    bend = rng.uniform(-0.6, 0.6) * width  # lateral bulge: the road curves
    half_bottom = rng.uniform(0.3, 0.75) * width
    t = np.clip((canvas.yy - horizon) / (height - horizon), 0, 1)  # 0 at the horizon, 1 at the bottom edge
    centre = vanish_x + (bottom_x - vanish_x) * t + bend * t * (1 - t)
    offset = canvas.xx - centre
    mask = (canvas.yy >= horizon) & (np.abs(offset) < half_bottom * t)
    asphalt = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.1), rng.uniform(0.22, 0.45))
    colour = asphalt + rng.normal(0, 1, (*canvas.size, 3)) * rng.uniform(5, 12)
    # Dashed centre markings, narrowing with distance; part of the road class, as in street datasets.
    depth = 1 / np.maximum(t, 0.02)
    dashes = (np.abs(offset) < 0.025 * half_bottom * t + 0.3) & ((depth * rng.uniform(1.5, 3)) % 1 < 0.5) & mask
    if rng.random() < 0.8:
        paint = _hsv(0.14, 0.8, 0.9) if rng.random() < 0.4 else np.array([230.0, 230, 225])
        colour = np.where(dashes[..., None], paint, colour)
    canvas.paint(mask, ROAD, colour)


def _vegetation(rng: np.random.Generator, canvas: _Canvas, horizon: float) -> None:
    height, width = canvas.size
    for _ in range(int(rng.integers(1, 5))):
        tree = rng.random() < 0.6
        radius = rng.uniform(0.07, 0.16) * width if tree else rng.uniform(0.04, 0.09) * width
        cy = horizon - rng.uniform(0.05, 0.3) * height if tree else horizon + rng.uniform(0.0, 0.3) * height
        cx = rng.uniform(0, width)
        distance = np.hypot(canvas.yy - cy, (canvas.xx - cx) * rng.uniform(0.7, 1.3)) / radius
        mask = distance + 0.45 * _value_noise(rng, canvas.size, max(radius / 2, 2)) < 1
        if not mask.any():
            continue
        hue = rng.uniform(0.2, 0.4) if rng.random() < 0.85 else rng.uniform(0.05, 0.11)  # some autumn trees
        leaf = _hsv(hue, rng.uniform(0.4, 0.8), rng.uniform(0.25, 0.6))
        speckle = rng.uniform(0.65, 1.35, canvas.size)[..., None]
        ys, xs = np.nonzero(mask)
        sides = (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        canvas.paint(mask, VEGETATION, leaf * speckle, {"kind": "tree" if tree else "bush",
                                                         "width_px": int(min(sides))})


def _pole(rng: np.random.Generator, canvas: _Canvas, horizon: float) -> tuple[float, float]:
    """One pole, as the band of pixel centres at signed distance [-w/2, w/2) from its axis; returns its top."""
    height, width = canvas.size
    stroke = int(rng.integers(POLE_WIDTHS[0], POLE_WIDTHS[1] + 1))
    base_y = rng.uniform(horizon + 0.05 * height, height + 0.1 * height)
    base_x = rng.uniform(0, width)
    length = rng.uniform(0.25, 0.7) * height
    angle = 0.0 if rng.random() < 0.5 else float(rng.choice([-1, 1]) * rng.uniform(3, 25))
    sin, cos = np.sin(np.radians(angle)), np.cos(np.radians(angle))
    # Axis direction (upwards) is (-cos, sin) in (y, x); the normal is (sin, cos).
    along = -(canvas.yy - base_y) * cos + (canvas.xx - base_x) * sin
    across = (canvas.yy - base_y) * sin + (canvas.xx - base_x) * cos
    mask = (along >= 0) & (along < length) & (across >= -stroke / 2) & (across < stroke / 2)
    metal = rng.random() < 0.8
    base = _hsv(rng.uniform(0, 1), rng.uniform(0, 0.12), rng.uniform(0.15, 0.75)) if metal else \
        _hsv(rng.uniform(0.06, 0.1), rng.uniform(0.4, 0.6), rng.uniform(0.25, 0.45))
    shading = (1 + 0.3 * across / max(stroke / 2, 0.5))[..., None]  # lit from one side, like a cylinder
    colour = base * shading + rng.normal(0, 4, (*canvas.size, 3))
    top = (base_y - length * cos, base_x + length * sin)
    if mask.any():
        canvas.paint(mask, POLE, colour, {"kind": "pole", "width_px": stroke, "angle_deg": round(angle, 2),
                                          "axis": [[round(base_y, 2), round(base_x, 2)],
                                                   [round(top[0], 2), round(top[1], 2)]]})
    return top


def _sign(rng: np.random.Generator, canvas: _Canvas, anchor: tuple[float, float] | None) -> None:
    """A sign of side 3-7 px (square, disc or triangle), on a pole's top or anywhere in the upper two thirds."""
    height, width = canvas.size
    side = int(rng.integers(SIGN_SIZES[0], SIGN_SIZES[1] + 1))
    if anchor is not None:
        y0, x0 = np.floor(anchor[0]), np.floor(anchor[1] - side / 2)
    else:
        y0, x0 = np.floor(rng.uniform(0, 0.66 * height)), np.floor(rng.uniform(0, width - side))
    shape = str(rng.choice(["square", "disc", "triangle"]))
    v, u = canvas.yy - y0, canvas.xx - x0  # centres of the side x side box are at 0.5 .. side - 0.5
    inside = (v > 0) & (v < side) & (u > 0) & (u < side)
    if shape == "disc":
        inside &= np.hypot(v - side / 2, u - side / 2) <= side / 2
    elif shape == "triangle":  # apex up: row r spans (r + 1) / side of the base
        inside &= np.abs(u - side / 2) <= (v / side) * side / 2 + 0.5
    colours = [(200, 35, 35), (35, 75, 190), (235, 205, 45), (35, 140, 65), (235, 235, 235)]
    fill = np.array(colours[int(rng.integers(len(colours)))], dtype=np.float64) + rng.uniform(-20, 20, 3)
    colour = np.broadcast_to(fill, (*canvas.size, 3)).copy()
    if side >= 5:  # a rim in a second colour, as real signs have
        rim = inside & ~((v > 1) & (v < side - 1) & (u > 1) & (u < side - 1))
        colour[rim] = np.array(colours[int(rng.integers(len(colours)))], dtype=np.float64)
    if inside.any():
        canvas.paint(inside, SIGN, colour, {"kind": "sign", "shape": shape, "width_px": side})


def render_street(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                            list[dict[str, Any]], dict[str, Any]]:
    """Draw one street scene.

    Args:
        rng: the scene's random source.
        size: (height, width).

    Returns:
        (image, label, instance_map, objects, scene): RGB uint8 (H, W, 3); uint8 class ids (H, W); int32 instance
        ids (H, W), 0 on stuff; one dict per visible thing (``id``, ``class``, ``class_name``, ``kind``,
        ``width_px``, kind-specific keys, ``area`` and ``bbox`` [x0, y0, x1, y1) of its visible pixels);
        scene-level facts (``horizon``, ``weather``).
    """
    height = size[0]
    canvas = _Canvas(size)
    horizon = rng.uniform(0.35, 0.55) * height
    weather = _sky(rng, canvas, horizon)
    _ground(rng, canvas, horizon)
    _buildings(rng, canvas, horizon)
    _road(rng, canvas, horizon)
    _vegetation(rng, canvas, horizon)
    tops = [_pole(rng, canvas, horizon) for _ in range(int(rng.integers(2, 7)))]
    for _ in range(int(rng.integers(2, 7))):
        on_pole = tops and rng.random() < 0.5
        _sign(rng, canvas, tops[int(rng.integers(len(tops)))] if on_pole else None)
    exposure = rng.uniform(0.75, 1.2) * rng.uniform(0.92, 1.08, 3)
    image = canvas.image * exposure + rng.normal(0, rng.uniform(3, 8), (*size, 3))
    objects = []
    for obj in canvas.objects:  # keep what is still visible after everything painted later
        ys, xs = np.nonzero(canvas.instance == obj["id"])
        if ys.size:
            bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            objects.append({**obj, "area": int(ys.size), "bbox": bbox})
    scene = {"horizon": round(float(horizon), 2), "weather": weather}
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), canvas.label, canvas.instance, objects, scene


# ---------------------------------------------------------------------------------------------------------------
# Instance masks as runs
# ---------------------------------------------------------------------------------------------------------------


def encode_runs(mask: np.ndarray) -> list[int]:
    """A boolean mask as row-major runs ``[start, length, start, length, ...]`` over the flattened image."""
    flat = np.concatenate([[False], np.asarray(mask, dtype=bool).ravel(), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return np.stack([starts, ends - starts], axis=1).ravel().tolist()


def decode_runs(runs: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """The (H, W) boolean mask of :func:`encode_runs` output."""
    flat = np.zeros(size[0] * size[1], dtype=bool)
    for start, length in zip(runs[0::2], runs[1::2]):
        flat[start:start + length] = True
    return flat.reshape(size)


class StreetScenes(Dataset):
    """A deterministic dataset of street scenes, yielding ``(image, label, name)`` like the other datasets.

    Args:
        num_images: dataset length.
        size: (height, width) of every image, at least 32 on each side.
        seed: base seed; with ``split`` and the index it fixes every scene.
        split: names an independent stream of scenes.
        transform: optional callable applied to ``(image, label)``.
    """

    classes = STREET_CLASSES
    palette = STREET_PALETTE

    def __init__(self, num_images: int, size: tuple[int, int] = (128, 128), seed: int = 0, split: str = "train",
                 transform: Callable | None = None) -> None:
        if min(size) < 32:
            raise RegproxyError(f"street scenes must be at least 32x32, got {size[1]}x{size[0]}")
        self.num_images = num_images
        self.size = (int(size[0]), int(size[1]))
        self.seed = seed
        self.split = split
        self.transform = transform
        # A stable number for the split name (Python's hash() changes between runs).
        self._stream = int.from_bytes(hashlib.blake2s(split.encode(), digest_size=4).digest(), "little")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_images

    def name(self, index: int) -> str:
        """The sample's name, also its file stem when written to disk."""
        return f"{self.split}_{index:05d}"

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]], dict[str, Any]]:
        """:func:`render_street` of scene ``index``, without the transform."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"scene {index} out of range for {self.num_images} images")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._stream, index, 0x57]))
        return render_street(rng, self.size)

    def __getitem__(self, index: int) -> tuple[Any, Any, str]:
        image, label, *_ = self.render(index)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label, self.name(index)

    def sidecar(self, index: int) -> dict[str, Any]:
        """The instance record of scene ``index``, as :func:`write_streets_dataset` stores it."""
        _, _, instance, objects, scene = self.render(index)
        return sidecar_record(instance, objects, scene)


def sidecar_record(instance: np.ndarray, objects: list[dict[str, Any]], scene: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready instance record of a rendered scene: its size, scene facts and objects with their runs."""
    return {"size": list(instance.shape), **scene,
            "objects": [{**obj, "runs": encode_runs(instance == obj["id"])} for obj in objects]}


def write_streets_dataset(root: str | Path, num_train: int = 400, num_val: int = 50,
                          size: tuple[int, int] = (128, 128), seed: int = 0) -> Path:
    """Write street scenes in the FolderDataset format, with an instance sidecar per image.

    Layout: ``classes.yaml``, ``images/{split}/*.png``, ``masks/{split}/*.png`` (palette PNGs of class ids) and
    ``instances/{split}/*.json`` (:meth:`StreetScenes.sidecar`). Skipped when ``root`` already holds a dataset
    written with the same arguments (the ``streets.yaml`` marker, written last, records them).

    Raises:
        RegproxyError: if ``root`` holds anything else.
    """
    root = Path(root)
    params = {"generator": "streets", "num_train": num_train, "num_val": num_val,
              "size": [int(size[0]), int(size[1])], "seed": seed}
    marker = root / _MARKER
    if marker.is_file() and yaml.safe_load(marker.read_text()) == params:
        return root
    if root.exists() and any(root.iterdir()):
        raise RegproxyError(f"{root} is not empty and holds no street dataset made with these settings; "
                            "choose a new directory or remove it")
    for split, count in (("train", num_train), ("val", num_val)):
        scenes = StreetScenes(count, size, seed, split)
        for folder in ("images", "masks", "instances"):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, label, instance, objects, scene = scenes.render(index)
            stem = scenes.name(index)
            save_png_atomic(root / "images" / split / f"{stem}.png", image)
            save_label_png(root / "masks" / split / f"{stem}.png", label, STREET_PALETTE)
            record = sidecar_record(instance, objects, scene)
            write_text_atomic(root / "instances" / split / f"{stem}.json", json.dumps(record, separators=(",", ":")))
    classes_yaml = {"classes": list(STREET_CLASSES), "palette": [list(c) for c in STREET_PALETTE]}
    write_text_atomic(root / "classes.yaml", yaml.safe_dump(classes_yaml, sort_keys=False))
    write_text_atomic(marker, yaml.safe_dump(params, sort_keys=False))
    return root


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """An ``instances/{split}/{stem}.json`` record; a missing or broken file is one clear error."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegproxyError(f"{path}: no instance sidecar (was the dataset written by write_streets_dataset?)") from None
    except (OSError, ValueError) as exc:
        raise RegproxyError(f"{path}: not a readable instance sidecar ({exc})") from None
    if not isinstance(record, dict) or "objects" not in record or "size" not in record:
        raise RegproxyError(f"{path}: not an instance sidecar (no 'size' and 'objects')")
    return record


# ---------------------------------------------------------------------------------------------------------------
# Per-object analysis
# ---------------------------------------------------------------------------------------------------------------


def object_recall(prediction: np.ndarray, sidecar: dict[str, Any]) -> list[dict[str, Any]]:
    """How much of each object a prediction labels with the object's class.

    Args:
        prediction: (H, W) predicted class ids at the sidecar's size.
        sidecar: a :func:`read_sidecar` record (or :meth:`StreetScenes.sidecar`).

    Returns:
        One dict per object: ``id``, ``class``, ``kind``, ``width_px``, ``area`` (visible pixels), ``hits`` (of
        them predicted as the object's class) and ``recall`` = hits / area.
    """
    size = tuple(sidecar["size"])
    prediction = np.asarray(prediction)
    if prediction.shape != size:
        raise RegproxyError(f"prediction shape {prediction.shape} != the sidecar's image size {size}")
    records = []
    for obj in sidecar["objects"]:
        mask = decode_runs(obj["runs"], size)
        area = int(mask.sum())
        if area == 0:
            continue
        hits = int((prediction[mask] == obj["class"]).sum())
        records.append({"id": obj["id"], "class": obj["class"], "kind": obj["kind"], "width_px": obj["width_px"],
                        "area": area, "hits": hits, "recall": hits / area})
    return records


def width_bin(width: float, edges: Sequence[int] = WIDTH_BINS) -> str:
    """The label of the bin ``width`` falls in: ``"3"``, ``"4-5"``, ``"8+"`` for the default edges."""
    if width < edges[0]:
        return f"<{edges[0]}"
    for low, high in itertools.pairwise(edges):
        if low <= width < high:
            return str(low) if high == low + 1 else f"{low}-{high - 1}"
    return f"{edges[-1]}+"


def recall_by_width(records: Sequence[dict[str, Any]], edges: Sequence[int] = WIDTH_BINS,
                    detected_at: float = 0.5) -> dict[str, dict[str, float | int]]:
    """Per-object recall pooled into width bins.

    Returns:
        bin label -> ``objects`` (count), ``mean_recall`` (mean of the objects' recalls: every object weighs the
        same), ``pixel_recall`` (hits / area over the bin's pixels) and ``detected`` (fraction of objects with
        recall >= ``detected_at``); bins in width order, empty bins left out.
    """
    labels = [width_bin(e, edges) for e in edges]
    grouped: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for record in records:
        grouped.setdefault(width_bin(record["width_px"], edges), []).append(record)
    table = {}
    for label, members in grouped.items():
        if not members:
            continue
        recalls = np.array([m["recall"] for m in members])
        table[label] = {"objects": len(members), "mean_recall": float(recalls.mean()),
                        "pixel_recall": sum(m["hits"] for m in members) / sum(m["area"] for m in members),
                        "detected": float((recalls >= detected_at).mean())}
    return table
