"""Segmenting videos: every (or every Nth) frame of a video into a colour-overlay video and, with ``frames``, one
label PNG per segmented frame (``regproxy predict clip.mp4``).

Engine layer, beside :mod:`regproxy_cli.engine.runner`: decoding and encoding are ``io.video``'s and the overlay is
``viz``'s, both above ``inference`` in the layering (tests/test_layers.py).
"""

from __future__ import annotations

import glob
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from regproxy_cli.data.video import VideoReader, is_video, write_video
from regproxy_cli.engine.outputs import check_opacity
from regproxy_cli.errors import RegproxyError
from regproxy_cli.images import save_label_png
from regproxy_cli.inference.pipeline import forward_batch, predict_label_batch, run_pipeline
from regproxy_cli.viz import overlay

VIDEO_OUTPUT_FILES = ("{}_overlay.mp4", "{}")  # what one video writes: the overlay, the folder of label maps


@dataclass
class VideoReport:
    """One video's outputs and what was found in it."""

    overlay: Path
    frames: int = 0  # frames in the overlay video (all of the source's)
    segmented: int = 0  # frames the network ran on (every Nth)
    label_pngs: list[Path] = field(default_factory=list)
    pixels: Counter = field(default_factory=Counter)  # class id -> pixel count over the segmented frames
    frames_with: Counter = field(default_factory=Counter)  # class id -> segmented frames it appears in


def predict_video(
    model: nn.Module,
    path: Path,
    out_dir: Path,
    *,
    frames: bool = False,
    every: int = 1,
    opacity: float = 0.5,
    batch: int = 1,
    stem: str | None = None,
    progress: Callable[[], object] | None = None,
    workers: int = 2,
    **options,
) -> VideoReport:
    """Segment a video: ``OUT/<stem>_overlay.mp4`` (every source frame, its size and frame rate, labels blended
    with ``opacity``) and with ``frames`` ``OUT/<stem>/<index:06d>.png`` label maps of the segmented frames.

    Frames 0, ``every``, 2 x ``every``, ... go through the network with
    :func:`~regproxy_cli.inference.pipeline.predict_label_batch` (``options``: mode, tta, scale, batch_size,
    precision), up to ``batch`` of them per forward pass on CUDA; each frame in between is drawn with the labels of
    the segmented frame before it. Decoding runs on this thread with the network, blending and encoding on a
    writer thread (:func:`~regproxy_cli.inference.pipeline.run_pipeline`; ``workers=0``: all on this thread). Any
    error stops the video and leaves no overlay file; ``progress()`` is called once per frame written.
    """
    if every < 1:
        raise RegproxyError(f"--every must be at least 1, got {every}")
    check_opacity(opacity)
    palette = np.array(model.config.palette, dtype=np.uint8)
    stem = stem or path.stem
    report = VideoReport(overlay=out_dir / f"{stem}_overlay.mp4")
    frame_dir = out_dir / stem
    held: list[np.ndarray] = []  # the labels of the last segmented frame (touched by the one writer thread only)

    def infer(items: list[tuple[int, np.ndarray]]) -> list[np.ndarray | None]:  # this thread: the network
        chosen = [frame for index, frame in items if index % every == 0]
        labels = iter(predict_label_batch(model, chosen, **options) if chosen else [])
        return [next(labels) if index % every == 0 else None for index, _ in items]

    def draw(item: tuple[int, np.ndarray], loaded, labels: np.ndarray | None) -> np.ndarray:  # the writer thread
        index, frame = item
        if labels is not None:
            held[:] = [labels]
            if frames:
                save_label_png(frame_dir / f"{index:06d}.png", labels, palette)
                report.label_pngs.append(frame_dir / f"{index:06d}.png")
            ids, counts = np.unique(labels, return_counts=True)
            report.pixels.update(dict(zip(ids.tolist(), counts.tolist())))
            report.frames_with.update(ids.tolist())
            report.segmented += 1
        return overlay(frame, held[0], palette, alpha=opacity)

    def overlays(video: VideoReader):
        results = run_pipeline(enumerate(video), _same, infer, draw, batch=forward_batch(model, batch),
                               workers=workers, key=_frame_shape)
        for (index, _), picture, error in results:
            if error is not None:
                raise RegproxyError(f"{path}: frame {index}: {error}")
            report.frames += 1
            if progress is not None:
                progress()
            yield picture

    out_dir.mkdir(parents=True, exist_ok=True)
    with VideoReader(path) as video:
        if frames:
            frame_dir.mkdir(exist_ok=True)
        write_video(report.overlay, overlays(video), video.info.fps)
    return report


def _same(item):
    return item


def _frame_shape(item: tuple[int, np.ndarray]) -> tuple[int, ...]:
    return item[1].shape


def expand_videos(inputs: list[str]) -> list[Path]:
    """Video files and glob patterns of them -> paths; anything else is an error (images go to their own run)."""
    paths = []
    for item in inputs:
        if glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file() and is_video(p))
            if not found:
                raise RegproxyError(f"{item}: no videos match")
            paths += found
        elif is_video(item):
            paths.append(Path(item))
        else:
            raise RegproxyError(f"{item}: not a video; segment images and videos in separate `regproxy predict` runs")
    return paths
