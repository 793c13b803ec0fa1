"""``regproxy predict clip.mp4``: segment every (or every Nth) frame of a video into a colour-overlay video and,
with ``--frames``, one label PNG per segmented frame. ``regproxy_cli.cli.predict`` hands video inputs here."""

from __future__ import annotations

import glob
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import typer
from rich import box
from rich.table import Table
from torch import nn
from tqdm import tqdm

from regproxy_cli.cli.options import (
    Precision,
    Provider,
    check_onnx_options,
    check_precision,
    check_window_batch,
    compile_if,
    model_device,
    parse_device,
)
from regproxy_cli.cli.output import console, print_error
from regproxy_cli.errors import RegproxyError
from regproxy_cli.images import save_label_png
from regproxy_cli.inference.pipeline import forward_batch, predict_label_batch, run_pipeline
from regproxy_cli.io.video import VideoReader, import_av, is_video, write_video
from regproxy_cli.io.zoo import load_model
from regproxy_cli.viz import overlay

FRAMES_HELP = ("Videos: also write each segmented frame's label PNG, OUT/<video name>/<frame number>.png "
               "(000000.png, ...; numbered from 0 in the source).")
EVERY_HELP = ("Videos: segment every Nth frame (0, N, 2N, ...). The overlay video keeps every frame at the source's "
              "rate; frames in between are drawn with the labels of the last segmented frame.")


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
    if not 0 <= opacity <= 1:
        raise RegproxyError(f"--opacity must be between 0 and 1, got {opacity}")
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


def predict_videos(
    inputs: list[str],
    *,
    model: str,
    out: Path,
    mode: str | None = None,
    scale: float = 1.0,
    tta: bool = False,
    device: str = "auto",
    precision: Precision = Precision.fp32,
    window_batch: int = 8,
    batch: int = 1,
    compile_network: bool = False,
    provider: Provider = Provider.cpu,
    frames: bool = False,
    every: int = 1,
    opacity: float = 0.5,
) -> None:
    """The video half of ``regproxy predict``: every input a video file (or a glob of them); a progress bar by
    frames, a summary of the classes found, and a non-zero exit when a video fails (the others still run)."""
    import_av()  # a missing extra stops here, before loading the model
    check_window_batch(window_batch)
    if batch < 1:
        raise RegproxyError(f"--batch must be at least 1, got {batch}")
    if every < 1:
        raise RegproxyError(f"--every must be at least 1, got {every}")
    if not 0 <= opacity <= 1:
        raise RegproxyError(f"--opacity must be between 0 and 1, got {opacity}")
    paths = expand_videos(inputs)
    torch_device = parse_device(model_device(device, model))
    run_precision = check_precision(precision, torch_device)
    segmenter = load_model(model, provider=provider.value).to(torch_device)
    check_onnx_options(segmenter, run_precision, compile_network)
    compile_if(compile_network, segmenter, run_precision)
    stems = Counter(p.stem for p in paths)
    reports, failed = [], []
    for path in paths:
        stem = path.stem if stems[path.stem] == 1 else f"{path.parent.name}_{path.stem}"
        try:
            with VideoReader(path) as video:  # the frame count for the bar, and a bad file fails before any output
                total = video.info.frames_estimate
            with tqdm(total=total, unit="frame", desc=path.name) as bar:
                reports.append(predict_video(segmenter, path, out, frames=frames, every=every, opacity=opacity,
                                             batch=batch, stem=stem, progress=bar.update, mode=mode, tta=tta,
                                             scale=scale, batch_size=window_batch, precision=run_precision))
        except RegproxyError as error:
            failed.append(str(error))
    for problem in failed:
        print_error(problem)
    if reports:
        _summary(segmenter.config.classes, reports)
        for report in reports:
            pngs = f" and {len(report.label_pngs)} label maps" if report.label_pngs else ""
            console.print(f"wrote {report.overlay} ({report.frames} frames, {report.segmented} segmented){pngs}")
    if failed:
        raise typer.Exit(1)


def _summary(classes: list[str], reports: list[VideoReport]) -> None:
    pixels = sum((report.pixels for report in reports), Counter())
    frames_with = sum((report.frames_with for report in reports), Counter())
    total = sum(pixels.values())
    table = Table(title="Classes present", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    for column in ("id", "class", "frames", "pixels %"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for class_id, count in pixels.most_common():
        table.add_row(str(class_id), classes[class_id], str(frames_with[class_id]), f"{100 * count / total:.1f}")
    console.print(table)
