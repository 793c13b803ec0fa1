"""``regproxy predict``: segment images into label PNGs, colour overlays and region pictures."""

from __future__ import annotations

import functools
import glob
import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich import box
from rich.table import Table
from torch import nn
from tqdm import tqdm

from regproxy_cli.cli.options import (
    CompileOption,
    DeviceOption,
    ModelOption,
    ModeOption,
    Precision,
    PrecisionOption,
    Provider,
    ProviderOption,
    TtaOption,
    WindowBatchOption,
    check_onnx_options,
    check_precision,
    check_window_batch,
    compile_if,
    model_device,
    parse_device,
)
from regproxy_cli.cli.output import console, err_console, print_error
from regproxy_cli.cli.video import EVERY_HELP, FRAMES_HELP, predict_videos
from regproxy_cli.constants import IMAGE_SUFFIXES
from regproxy_cli.errors import RegproxyError, one_line
from regproxy_cli.files import write_atomic
from regproxy_cli.images import load_image, save_label_png, save_png_atomic
from regproxy_cli.inference.confidence import ConfidenceMaps, predict_confidence
from regproxy_cli.inference.pipeline import forward_batch, predict_label_batch, run_pipeline
from regproxy_cli.data.formats import COCO_FILE, AnnotationWriter, check_formats
from regproxy_cli.io.video import is_video
from regproxy_cli.io.zoo import load_model
from regproxy_cli.model.classifiers import label_levels
from regproxy_cli.viz import confidence_pictures, overlay, predict_regions

SUMMARY = "Segment images into label PNGs, colour overlays and region pictures."
HELP = """Segment images: files, directories and glob patterns. For each image writes OUT/<name>.png (class ids,
palette-coloured), OUT/<name>_overlay.png and, with --regions, OUT/<name>_regions.png (the learned regions: their
boundaries as lines over the image at its size, each region tinted by its token's class or, --regions-by token, in a
colour of its own). --confidence adds heat maps (dark violet low, yellow high, fixed scales): OUT/<name>_maxprob.png
(the top class probability, 0 to 1), OUT/<name>_entropy.png (the entropy of the class probabilities, 0 to ln K) and,
with --tta, OUT/<name>_disagreement.png (the fraction of the 12 augmented views whose own label differs from the
final one). --save-probs writes OUT/<name>_probs.npz (float16): `probs`, the K class probabilities at the model's
output resolution (the working size divided by the output stride, 4 for /16 models), and `max_prob`, `entropy`
(nats) and, with --tta, `disagreement` at the image's size, plus `classes`.
--format coco|labelme|cvat (repeatable) writes annotation-tool files instead or as well: OUT/predictions.json
(COCO RLE, category_id = class id), OUT/<name>.json (labelme polygons), OUT/cvat.zip (CVAT Segmentation mask 1.1).

<name> is the image's file stem. Inputs that share a stem are named <folder>_<stem>, and when that is taken too,
<folder>_<stem>_<suffix>, then -2, -3, ...: the names are fixed before the first write, so no output overwrites
another (compared ignoring case). An image that fails is one error line; the others still run, and the exit
status is 1.

--model takes a zoo name (see `regproxy models`), a Hub repo id, a model directory, an authors' .pth file or a
`regproxy export`ed .onnx file (run by onnxruntime on --provider)."""

EXAMPLES = """[bold]Examples[/]

  regproxy predict photo.jpg --model s16-ade

  regproxy predict photos/ 'more/*.png' --model s16-ade --out seg --regions --tta

  regproxy predict photo.jpg --model s16-ade --confidence --tta --save-probs --opacity 0.35"""

BATCH_HELP = ("Images per forward pass on CUDA: consecutive images of one size are batched (not with --tta). On a CPU "
              "the network runs image by image anyway, so this only applies on CUDA.")


class OutputFormat(str, Enum):
    """What predict writes: label PNG + overlay, COCO RLE, labelme polygons, CVAT Segmentation mask 1.1."""

    png = "png"
    coco = "coco"
    labelme = "labelme"
    cvat = "cvat"


FORMAT_HELP = ("Output format, repeatable (default: png): png (label PNG + overlay), coco (OUT/predictions.json), "
               "labelme (OUT/<name>.json), cvat (OUT/cvat.zip). coco and labelme need the 'annotations' extra.")
TOLERANCE_HELP = "labelme polygons: simplification tolerance in pixels (0: exact region boundaries)."
CONFIDENCE_HELP = ("Also write heat maps of the top class probability and the entropy (and with --tta the views' "
                   "disagreement).")
SAVE_PROBS_HELP = "Also write OUT/<name>_probs.npz: class probabilities (float16) and the confidence maps."
OPACITY_HELP = "Weight of the class colours in the overlay, 0 (photo only) to 1 (colours only)."


class RegionsBy(str, Enum):
    """How --regions tints each learned region: its token's predicted class, or a colour per token."""

    cls = "class"
    token = "token"
    prototype = "prototype"


REGIONS_BY_HELP = ("Tint each region with its token's predicted class colour (class), a colour per token (token) or "
                   "the shade of the class prototype its token matched (prototype, a protoseg model); implies "
                   "--regions.")
PROTOTYPES_HELP = "Colour the learned regions by the prototype that painted them (a protoseg model); implies --regions."


def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image or video files, directories or glob patterns.")],
    model: ModelOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("predictions"),
    mode: ModeOption = None,
    scale: Annotated[float, typer.Option(help="Multiply the model's test scale.")] = 1.0,
    tta: TtaOption = False,
    regions: Annotated[bool, typer.Option("--regions", help="Also draw the learned regions.")] = False,
    regions_by: Annotated[RegionsBy | None, typer.Option("--regions-by", help=REGIONS_BY_HELP)] = None,
    prototypes: Annotated[bool, typer.Option("--prototypes", help=PROTOTYPES_HELP)] = False,
    confidence: Annotated[bool, typer.Option("--confidence", help=CONFIDENCE_HELP)] = False,
    save_probs: Annotated[bool, typer.Option("--save-probs", help=SAVE_PROBS_HELP)] = False,
    opacity: Annotated[float, typer.Option("--opacity", help=OPACITY_HELP)] = 0.5,
    device: DeviceOption = "auto",
    window_batch: WindowBatchOption = 8,
    precision: PrecisionOption = Precision.fp32,
    compile_network: CompileOption = False,
    provider: ProviderOption = Provider.cpu,
    formats: Annotated[list[OutputFormat] | None, typer.Option("--format", help=FORMAT_HELP)] = None,
    polygon_tolerance: Annotated[float, typer.Option("--polygon-tolerance", min=0.0, help=TOLERANCE_HELP)] = 1.0,
    batch: Annotated[int, typer.Option("--batch", help=BATCH_HELP)] = 1,
    frames: Annotated[bool, typer.Option("--frames", help=FRAMES_HELP)] = False,
    every: Annotated[int, typer.Option("--every", min=1, help=EVERY_HELP)] = 1,
) -> None:
    if prototypes:
        if regions_by not in (None, RegionsBy.prototype):
            raise RegproxyError(f"--prototypes colours regions by prototype; it cannot go with --regions-by "
                                f"{regions_by.value}")
        regions_by = RegionsBy.prototype
    if any(is_video(item) for item in inputs):  # .mp4/.mov/.avi/.mkv/.webm: regproxy_cli.cli.video
        image_only = {"--regions": regions or regions_by is not None, "--confidence": confidence,
                      "--save-probs": save_probs, "--format": bool(formats) and formats != [OutputFormat.png]}
        given = [option for option, used in image_only.items() if used]
        if given:
            raise RegproxyError(f"{', '.join(given)} apply to images; a video gets OUT/<name>_overlay.mp4 and, with "
                                "--frames, label PNGs (segment videos and images in separate calls)")
        return predict_videos(inputs, model=model, out=out, mode=mode.value if mode else None, scale=scale, tta=tta,
                              device=device, precision=precision, window_batch=window_batch, batch=batch,
                              compile_network=compile_network, provider=provider, frames=frames, every=every,
                              opacity=opacity)
    check_window_batch(window_batch)
    if not 0 <= opacity <= 1:
        raise RegproxyError(f"--opacity must be between 0 and 1, got {opacity}")
    regions = regions or regions_by is not None
    output_formats = check_formats(formats or [OutputFormat.png])  # a missing extra stops here, before loading
    if batch < 1:
        raise RegproxyError(f"--batch must be at least 1, got {batch}")
    torch_device = parse_device(model_device(device, model))
    run_precision = check_precision(precision, torch_device)
    paths, problems = expand_inputs(inputs)
    check_out_dir(out)  # an --out that is a file or cannot be written stops here, before the model loads
    segmenter = load_model(model, provider=provider.value).to(torch_device)
    check_onnx_options(segmenter, run_precision, compile_network, regions)
    compile_if(compile_network, segmenter, run_precision)
    prepare_out_dir(out)  # created only once the model has loaded
    partial = PredictReport()  # filled as images finish: what a Ctrl-C can report
    try:
        with tqdm(total=len(paths), unit="image", desc="segmenting", disable=not paths) as bar:
            report = predict_files(segmenter, paths, out, regions=regions, progress=bar.update,
                          formats=output_formats, polygon_tolerance=polygon_tolerance,
                          regions_by=(regions_by or RegionsBy.cls).value, confidence=confidence,
                          save_probs=save_probs, opacity=opacity,
                          mode=mode.value if mode else None, tta=tta, scale=scale, batch_size=window_batch,
                          precision=run_precision, batch=batch, report=partial)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: {len(partial.finished)} of {len(paths)} images written to {out} (each file "
                          "complete); run the same command again to segment them all")
        raise typer.Exit(130) from None
    for problem in problems + report.failed:
        print_error(problem)
    if report.written:
        _summary(segmenter.config, report)
        console.print(f"wrote {len(report.written)} label maps to {out}")
    if problems or report.failed or not report.written:
        raise typer.Exit(1)


def _summary(config, report) -> None:
    total = sum(report.pixels.values())
    table = Table(title="Classes present", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    for column in ("id", "class", "images", "pixels %"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for class_id, pixels in report.pixels.most_common():
        table.add_row(str(class_id), config.classes[class_id], str(report.images[class_id]),
                      f"{100 * pixels / total:.1f}")
    console.print(table)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files, directories (their images, sorted) and glob patterns -> (image paths, problems)."""
    paths, problems = [], []
    for item in inputs:
        if glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            found = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            paths += found
            if not found:
                problems.append(f"{item}: no images match")
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            paths += found
            if not found:
                problems.append(f"{item}: no images in this directory")
        else:
            paths.append(Path(item))  # a missing or bad file is reported when it is read
    unique = {os.path.realpath(p): p for p in reversed(paths)}  # one file named twice is segmented once
    return [p for p in paths if unique.get(os.path.realpath(p)) is p], problems


def check_out_dir(out_dir: Path) -> None:
    """One error line when ``out_dir`` is a file, or would be created under a file or a folder that cannot be
    written; nothing is created (a model that then fails to load leaves no empty folder)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RegproxyError(f"--out {out_dir}: exists and is not a folder")
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise RegproxyError(f"--out {out_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RegproxyError(f"--out {out_dir}: {existing} is not writable")


def prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir``; one error line when it is a file or cannot be created or written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RegproxyError(f"--out {out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RegproxyError(f"--out {out_dir}: cannot create the folder ({one_line(error)})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise RegproxyError(f"--out {out_dir}: this folder is not writable")


# The files one image may get, by name: every one is checked against every other image's before anything runs.
OUTPUT_FILES = ("{}.png", "{}_overlay.png", "{}_regions.png", "{}_maxprob.png", "{}_entropy.png",
                "{}_disagreement.png", "{}_probs.npz", "{}.json")


def output_names(paths: list[Path], levels: tuple[str, ...] = ()) -> dict[Path, str]:
    """Each input's output name, distinct by construction: the stem; for a stem several inputs share,
    ``<folder>_<stem>``; when that (or one of its files, e.g. ``x_overlay.png`` of an input ``x_overlay``) is taken,
    ``<folder>_<stem>_<suffix>``, then ``-2``, ``-3``, ... Names and file names are compared ignoring case (a
    case-insensitive file system would merge them)."""
    templates = OUTPUT_FILES + tuple(f"{{}}_{level}.png" for level in levels)
    stems = Counter(p.stem.casefold() for p in paths)
    taken = {COCO_FILE.casefold(), "cvat.zip"}  # the run's own files: an input named 'predictions' must not get them
    names: dict[Path, str] = {}

    def files(name: str) -> set[str]:
        return {template.format(name).casefold() for template in templates}

    def candidates(path: Path) -> Iterator[str]:
        prefix = f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem
        if stems[path.stem.casefold()] == 1:
            yield path.stem
        yield prefix
        if path.suffix:
            yield f"{prefix}_{path.suffix.lstrip('.')}"
        yield from (f"{prefix}-{number}" for number in itertools.count(2))

    # inputs with a stem of their own first: they keep it whenever possible
    for path in sorted(paths, key=lambda p: stems[p.stem.casefold()] > 1):
        name = next(c for c in candidates(path) if not files(c) & taken)
        taken |= files(name)
        names[path] = name
    return names


@dataclass
class PredictReport:
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

    Output names come from :func:`output_names` (distinct, fixed before the first write). Any exception while
    segmenting or writing one image is that image's error line in ``report.failed``. ``report`` (filled as images
    finish) may be passed in, so a caller still knows what was written when a Ctrl-C stops the run."""
    prepare_out_dir(out_dir)
    palette = np.array(model.config.palette, dtype=np.uint8)
    report = PredictReport() if report is None else report
    png = "png" in check_formats(formats)
    annotations = AnnotationWriter(out_dir, formats, model.config.classes, model.config.palette,
                                   polygon_tolerance=polygon_tolerance)
    levels = level_maps(model)
    names = output_names(paths, tuple(levels))

    @_one_image
    def infer(images: list[np.ndarray]) -> list[tuple]:  # on this thread: the network
        if confidence or save_probs:
            maps = [predict_confidence(model, image, grid_probs=save_probs, **options) for image in images]
            labels = [one.labels for one in maps]
        else:
            maps, labels = [None] * len(images), predict_label_batch(model, images, **options)
        pictures = [predict_regions(model, image, scale=options.get("scale", 1.0), by=regions_by) if regions else None
                    for image in images]
        return list(zip(labels, pictures, maps))

    @_one_image
    def write(path: Path, image: np.ndarray, result: tuple):  # on the pool
        labels, picture, maps = result
        stem = names[path]
        written = _write_outputs(out_dir, stem, image, labels, palette, picture, png=png, opacity=opacity)
        for level, (lookup, level_palette) in levels.items():  # e.g. <stem>_category.png of an HSSN model
            if png:
                save_label_png(out_dir / f"{stem}_{level}.png", lookup[labels], level_palette)
        if maps is not None:
            _write_confidence(out_dir, stem, maps, model.config.classes, pictures=confidence, probs=save_probs)
        annotations.add(stem, labels, path)
        report.finished.append(written)  # list.append is atomic: what an interrupted run can truly claim
        return written, np.unique(labels, return_counts=True)

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
    annotations.close()  # COCO's predictions.json and the CVAT zip, once
    return report


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
