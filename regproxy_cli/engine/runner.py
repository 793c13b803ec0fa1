"""Running a model over files: ``open_model`` (the one way every command opens a model to run), and
``predict_files`` with its pieces (segmenting, the writers) behind ``regproxy predict``; the inputs and the
output names are :mod:`~regproxy_cli.engine.outputs`'.

This is the engine layer, not ``inference/``: segmenting files draws overlays and region pictures (``viz``) and
opens models through ``io.zoo``, both above ``inference`` in the layering (tests/test_layers.py). The network
calls themselves are ``inference``'s; the annotation-tool writers are ``data.formats``'.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from regproxy_cli.data.formats import AnnotationWriter, check_formats
from regproxy_cli.engine.distributed import all_gather_objects, rank_world
from regproxy_cli.engine.outputs import expected_files, output_names, prepare_out_dir
from regproxy_cli.errors import RegproxyError, one_line
from regproxy_cli.files import write_atomic
from regproxy_cli.hub.zoo import load_model
from regproxy_cli.images import load_image, save_label_png, save_png_atomic
from regproxy_cli.inference.confidence import ConfidenceMaps, predict_confidence
from regproxy_cli.inference.pipeline import forward_batch, predict_label_batch, run_pipeline
from regproxy_cli.inference.quantize import quantize_int8
from regproxy_cli.inference.runtime import compile_backbone
from regproxy_cli.model.classifiers import label_levels
from regproxy_cli.onnx.runtime import OnnxModel
from regproxy_cli.viz import confidence_pictures, overlay, predict_regions


def open_model(
    model: str,
    device: torch.device,
    *,
    precision: str = "fp32",
    provider: str = "cpu",
    compile_network: bool = False,
    regions: bool = False,
    status: Callable[[str], AbstractContextManager] = lambda message: nullcontext(),
) -> nn.Module:
    """Load ``model`` (zoo name, Hub repo id, model directory, .pth or .onnx run on ``provider``) onto ``device``,
    ready to run at ``precision`` (already checked against the device): an ONNX model refuses the options that need
    PyTorch, and ``compile_network`` compiles the backbone, warmed up at the crop size, inside ``status(message)``."""
    segmenter = load_model(model, provider=provider).to(device)
    check_onnx_options(segmenter, precision, compile_network, regions)
    if precision == "int8":  # a conversion made once, before any compiling
        quantize_int8(segmenter)
    if compile_network:
        crop = segmenter.config.crop_size
        with status(f"compiling the backbone ({crop}x{crop} warm-up)"):
            compile_backbone(segmenter, precision, size=(crop, crop))
    return segmenter


def check_onnx_options(model: nn.Module, precision: str, compile_network: bool, regions: bool = False) -> None:
    """An ONNX model runs its graph as exported: --precision, --compile and --regions need the PyTorch model."""
    if not isinstance(model, OnnxModel):
        return
    for option, used in ((f"--precision {precision}", precision != "fp32"), ("--compile", compile_network),
                         ("--regions", regions)):
        if used:
            raise RegproxyError(f"{option} needs a PyTorch model: {model.path.name} runs through onnxruntime as "
                                f"exported; drop {option.split()[0]} or use the model it was exported from")


@dataclass
class PredictReport:
    """What a predict_files run wrote and found; filled as images finish."""

    written: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    finished: list[Path] = field(default_factory=list)  # appended by the writer as each image's files are complete
    pixels: Counter = field(default_factory=Counter)  # class id -> pixel count over all images
    images: Counter = field(default_factory=Counter)  # class id -> number of images it appears in


def predict_files(
    model: nn.Module,
    paths: list[Path],
    out_dir: Path,
    *,
    regions: bool = False,
    progress=None,
    formats: list[str] | tuple[str, ...] = ("png",),
    polygon_tolerance: float = 1.0,
    batch: int = 1,
    workers: int = 2,
    regions_by: str = "class",
    confidence: bool = False,
    save_probs: bool = False,
    opacity: float = 0.5,
    report: PredictReport | None = None,
    names: dict[Path, str] | None = None,
    **options,
) -> PredictReport:
    """Segment each image, writing ``<stem>.png`` (class ids, palette), ``<stem>_overlay.png`` (colours at weight
    ``opacity``) and, with ``regions``, ``<stem>_regions.png`` (tinted ``regions_by`` class or token); the first
    two only when ``formats`` has "png", and "coco", "labelme", "cvat" add those files
    (:class:`regproxy_cli.data.formats.AnnotationWriter`, ``polygon_tolerance`` for labelme). ``confidence``
    adds ``<stem>_maxprob.png``, ``<stem>_entropy.png`` and with TTA ``<stem>_disagreement.png``, ``save_probs``
    ``<stem>_probs.npz`` (labels then come from the same pass,
    :func:`~regproxy_cli.inference.confidence.predict_confidence`, one image at a time). A bad input is recorded
    and the rest still run.

    Decoding and writing run on ``workers`` threads (0: all on this one) while this thread runs the network; on
    CUDA, up to ``batch`` consecutive same-size images share a forward pass
    (:func:`regproxy_cli.inference.pipeline.run_pipeline`). Outputs and the report do not depend on ``workers``.

    Output names come from :func:`output_names` (distinct, fixed before the first write), or ``names`` when given
    (a share of a longer list, named from the whole list: :func:`predict_shard`). Any exception while
    segmenting or writing one image is that image's error line in ``report.failed``. ``report`` (filled as images
    finish) may be passed in, so a caller still knows what was written when a Ctrl-C stops the run."""
    prepare_out_dir(out_dir)
    report = PredictReport() if report is None else report
    writer = OutputWriter(model, out_dir, paths if names is None else names, formats=formats,
                          polygon_tolerance=polygon_tolerance, opacity=opacity, confidence=confidence,
                          save_probs=save_probs)

    @_one_image
    def infer(images: list[np.ndarray]) -> list[tuple]:  # on this thread: the network
        return segment(model, images, regions=regions, regions_by=regions_by, confidence=confidence,
                       save_probs=save_probs, **options)

    @_one_image
    def write(path: Path, image: np.ndarray, result: tuple):  # on the pool
        written, histogram = writer.write(path, image, result)
        report.finished.append(written)  # list.append is atomic: what an interrupted run can truly claim
        return written, histogram

    for path, done, error in run_pipeline(paths, load_image, infer, write, batch=forward_batch(model, batch),
                                          workers=workers):
        if error is not None:
            report.failed.append(error if error.startswith(str(path)) else f"{path}: {error}")
        else:
            written, (ids, counts) = done
            report.written.append(written)
            report.pixels.update(dict(zip(ids.tolist(), counts.tolist())))
            report.images.update(ids.tolist())
        if progress is not None:
            progress()
    writer.close()  # COCO's predictions.json and the CVAT zip, once
    return report


def check_shardable(formats: list[str] | tuple[str, ...], world: int) -> None:
    """COCO's predictions.json and the CVAT zip hold the whole run: one process writes them, not torchrun's several."""
    whole = [f for f in formats if f in ("coco", "cvat")]
    if world > 1 and whole:
        raise RegproxyError(f"--format {' and '.join(whole)} write one file for the whole run; under torchrun use "
                            "png or labelme, or run one process")


def predict_shard(model: nn.Module, paths: list[Path], out_dir: Path, *, report: PredictReport | None = None,
                  **options) -> PredictReport:
    """:func:`predict_files` of this process's share of ``paths`` under torchrun (all of them in one process): every
    ``world``-th path from the rank's own, sorted as :func:`~regproxy_cli.engine.outputs.expand_inputs` gave them,
    so the shares are disjoint and together all the paths (sizes differ by one at most). Output names come from the whole list, so they are those
    of one process. Returns every process's report merged (each process calls this; the collective waits for all).
    """
    rank, world = rank_world()
    check_shardable(check_formats(options.get("formats", ("png",))), world)
    names = output_names(paths, tuple(level_maps(model)))
    mine = predict_files(model, paths[rank::world], out_dir, names=names, report=report, **options)
    if world == 1:
        return mine
    merged = PredictReport()
    for one in all_gather_objects(PredictReport(mine.written, mine.failed, [], mine.pixels, mine.images)):
        merged.written += one.written
        merged.failed += one.failed
        merged.pixels.update(one.pixels)
        merged.images.update(one.images)
    return merged


def segment(model: nn.Module, images: list[np.ndarray], *, regions: bool = False, regions_by: str = "class",
            confidence: bool = False, save_probs: bool = False, **options) -> list[tuple]:
    """(labels, regions picture or None, confidence maps or None) of each image: what :class:`OutputWriter` writes.
    Same-size images share a forward pass on CUDA (:func:`~regproxy_cli.inference.pipeline.predict_label_batch`);
    ``confidence``/``save_probs`` take labels from the confidence pass, one image at a time."""
    if confidence or save_probs:
        maps = [predict_confidence(model, image, grid_probs=save_probs, **options) for image in images]
        labels = [one.labels for one in maps]
    else:
        maps, labels = [None] * len(images), predict_label_batch(model, images, **options)
    pictures = [predict_regions(model, image, scale=options.get("scale", 1.0), by=regions_by) if regions else None
                for image in images]
    return list(zip(labels, pictures, maps))


class OutputWriter:
    """Every output file of a run's images, each under its name from :func:`output_names`: the label PNG and
    overlay (format png), a hierarchical model's level PNGs, the regions picture, the confidence pictures and
    ``.npz``, and the annotation files (:class:`~regproxy_cli.data.formats.AnnotationWriter`). Every file is written
    atomically, so an image whose :meth:`expected` files all exist is complete (what a resumed run skips).

    ``names``: the run's inputs (names are computed from them) or their names already computed, e.g. from a longer
    list than this process writes (a torchrun rank's share, a Ray actor's batches)."""

    def __init__(self, model: nn.Module, out_dir: Path, names: list[Path] | dict[Path, str], *,
                 formats: list[str] | tuple[str, ...] = ("png",), polygon_tolerance: float = 1.0,
                 opacity: float = 0.5, confidence: bool = False, save_probs: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.palette = np.array(model.config.palette, dtype=np.uint8)
        self.classes = model.config.classes
        self.formats = check_formats(formats)
        self.png = "png" in self.formats
        self.opacity, self.confidence, self.save_probs = opacity, confidence, save_probs
        self.levels = level_maps(model)
        self.names = names if isinstance(names, dict) else output_names(list(names), tuple(self.levels))
        self.annotations = AnnotationWriter(self.out_dir, self.formats, model.config.classes, model.config.palette,
                                            polygon_tolerance=polygon_tolerance)

    def expected(self, path: Path, *, regions: bool = False, tta: bool = False) -> list[Path]:
        """The files :meth:`write` leaves for ``path`` (not COCO's or CVAT's, which hold the whole run)."""
        files = expected_files(self.names[path], levels=tuple(self.levels), formats=self.formats, regions=regions,
                               confidence=self.confidence, tta=tta, save_probs=self.save_probs)
        return [self.out_dir / file for file in files]

    def write(self, path: Path, image: np.ndarray, result: tuple) -> tuple[Path, tuple[np.ndarray, np.ndarray]]:
        """One image's files from :func:`segment`'s ``result``; returns (the label map's path, (class ids, pixel
        counts))."""
        labels, picture, maps = result
        stem = self.names[path]
        written = _write_outputs(self.out_dir, stem, image, labels, self.palette, picture, png=self.png,
                                 opacity=self.opacity)
        for level, (lookup, level_palette) in self.levels.items():  # e.g. <stem>_category.png of an HSSN model
            if self.png:
                save_label_png(self.out_dir / f"{stem}_{level}.png", lookup[labels], level_palette)
        if maps is not None:
            _write_confidence(self.out_dir, stem, maps, self.classes, pictures=self.confidence,
                              probs=self.save_probs)
        self.annotations.add(stem, labels, path)
        return written, np.unique(labels, return_counts=True)

    def close(self) -> None:
        self.annotations.close()


def _one_image(step: Callable) -> Callable:
    """``step`` with any exception but an interrupt turned into a RegproxyError: the pipeline then fails that image
    (a group is retried image by image) and goes on with the next, instead of ending the run."""
    @functools.wraps(step)
    def guarded(*args: Any) -> Any:
        try:
            return step(*args)
        except RegproxyError:
            raise
        except Exception as error:
            raise RegproxyError(f"failed ({type(error).__name__}: {one_line(error)})") from error

    return guarded


def level_maps(model: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each coarser label level of the model (:func:`~regproxy_cli.model.classifiers.label_levels`): the class ->
    level lookup and the level's palette, each level class in the colour of its first class."""
    palette = np.array(model.config.palette, dtype=np.uint8)
    maps = {}
    for name, (classes, to_level) in label_levels(model).items():
        lookup = to_level.cpu().numpy().astype(np.int64)
        first = [int(np.flatnonzero(lookup == index)[0]) for index in range(len(classes))]
        maps[name] = (lookup, palette[first])
    return maps


def _write_outputs(out_dir: Path, stem: str, image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
                   regions_picture: np.ndarray | None, png: bool = True, opacity: float = 0.5) -> Path:
    """One image's output files (called on the writer threads); returns the label map's path."""
    if png:
        save_label_png(out_dir / f"{stem}.png", labels, palette)
        save_png_atomic(out_dir / f"{stem}_overlay.png", overlay(image, labels, palette, alpha=opacity))
    if regions_picture is not None:
        save_png_atomic(out_dir / f"{stem}_regions.png", regions_picture)
    return out_dir / f"{stem}.png"


def _write_confidence(out_dir: Path, stem: str, maps: ConfidenceMaps, classes: list[str], *, pictures: bool,
                      probs: bool) -> None:
    """The confidence heat maps (``pictures``) and the ``<stem>_probs.npz`` arrays (``probs``) of one image."""
    if pictures:
        for name, picture in confidence_pictures(maps, len(classes)).items():
            save_png_atomic(out_dir / f"{stem}_{name}.png", picture)
    if probs:
        arrays = {"probs": maps.probs, "max_prob": maps.max_prob, "entropy": maps.entropy}
        if maps.disagreement is not None:
            arrays["disagreement"] = maps.disagreement
        arrays = {name: value.astype(np.float16) for name, value in arrays.items()}
        path = out_dir / f"{stem}_probs.npz"

        def save(temporary: str) -> None:
            with open(temporary, "wb") as file:  # a file object: np.savez would add .npz to the temporary name
                np.savez_compressed(file, **arrays, classes=np.array(classes))

        try:
            write_atomic(path, save)
        except OSError as error:
            raise RegproxyError(f"{path}: cannot write ({error})") from None
