"""Pascal VOC: its colormap (which CVAT's object masks use too) and ``data import --from voc``.

``JPEGImages``, ``SegmentationClass`` palette PNGs and ``ImageSets/Segmentation``: class ids as they are, 255 (the
object borders) ignored, its train/val lists kept as the splits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from regproxy_cli.constants import IGNORE_INDEX
from regproxy_cli.data.formats.common import Entry, Palette, Source, by_stem, plain_name
from regproxy_cli.errors import RegproxyError, listed, one_line

SPLITS = ("train", "val")
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_colormap(count: int = 256) -> np.ndarray:
    """(count, 3) uint8 Pascal VOC colours (index bits spread over the channels), CVAT's object colours."""
    index = np.arange(count)
    colours = np.zeros((count, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((index >> channel) & 1) << shift
        index = index >> 3
    return colours.astype(np.uint8)


def read_voc_source(source: Path, wanted: list[str] | None, images: Path | None,
                    background: str | None, *, allow_outside: bool = False) -> Source:
    """Pascal VOC: ``JPEGImages/``, ``SegmentationClass/*.png`` and the ``ImageSets/Segmentation`` lists."""
    candidates = [source, source / "VOC2012", source / "VOCdevkit" / "VOC2012",
                  *sorted(source.glob("VOCdevkit/VOC*")), *sorted(source.glob("VOC*"))]
    base = next((c for c in candidates if (c / "SegmentationClass").is_dir()), None)
    if base is None:
        raise RegproxyError(f"{source}: no SegmentationClass folder (expected VOC's layout, e.g. "
                            f"{source / 'VOCdevkit' / 'VOC2012' / 'SegmentationClass'})")
    classes = list(wanted) if wanted is not None else list(VOC_CLASSES)
    lists = base / "ImageSets" / "Segmentation"
    named: list[tuple[str, str | None]]
    if all((lists / f"{split}.txt").is_file() for split in SPLITS):
        named = []
        for split in SPLITS:
            listed_in = lists / f"{split}.txt"
            try:
                text = listed_in.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise RegproxyError(f"{listed_in}: cannot read the list ({one_line(error)})") from None
            stems = [line.strip() for line in text.splitlines() if line.strip()]
            named += [(plain_name(stem, f"{listed_in}: line {stem!r}"), split) for stem in stems]
    else:  # no lists: every mask, split by the seeded draw
        named = [(p.stem, None) for p in sorted((base / "SegmentationClass").glob("*.png"))]
    folders = [images] if images is not None else [base / "JPEGImages"]
    colours = [tuple(int(v) for v in c) for c in voc_colormap(256)]
    entries = []
    for stem, split in named:
        mask_path = base / "SegmentationClass" / f"{stem}.png"
        if not mask_path.is_file():
            raise RegproxyError(f"{lists / f'{split}.txt'} lists {stem}, but {mask_path} does not exist")
        picture = by_stem(stem, folders[0], str(mask_path))
        entries.append(Entry(stem, str(mask_path), picture, _voc_labels(mask_path, colours, len(classes)), split))
    return Source(classes, colours[: len(classes)], entries)


def _voc_labels(path: Path, colours: Palette, count: int) -> Callable[[], np.ndarray]:
    def labels() -> np.ndarray:
        # imported here: the datasets module brings torch, which reading and writing formats does not need
        from regproxy_cli.data.datasets import load_mask

        values = load_mask(path, colours).astype(np.int64)  # palette indices; an RGB mask is decoded by colour
        bad = (values >= count) & (values != IGNORE_INDEX)
        if bad.any():
            found = sorted(np.unique(values[bad]).tolist())
            raise RegproxyError(f"{path}: value(s) {listed([str(v) for v in found])} are not class ids "
                                f"0..{count - 1} or {IGNORE_INDEX} (ignore)")
        return values

    return labels
