"""``regproxy predict``: segment images into label PNGs, colour overlays and region pictures."""

from __future__ import annotations

import glob
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

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
    TtaOption,
    WindowBatchOption,
    check_precision,
    check_window_batch,
    compile_if,
    parse_device,
)
from regproxy_cli.cli.output import console, err_console
from regproxy_cli.constants import IMAGE_SUFFIXES
from regproxy_cli.errors import RegproxyError
from regproxy_cli.images import load_image, save_label_png, save_png_atomic
from regproxy_cli.inference.predictor import predict_labels
from regproxy_cli.io.zoo import load_model
from regproxy_cli.viz import overlay, predict_regions

SUMMARY = "Segment images into label PNGs, colour overlays and region pictures."
HELP = """Segment images: files, directories and glob patterns. For each image writes OUT/<name>.png (class ids,
palette-coloured), OUT/<name>_overlay.png and, with --regions, OUT/<name>_regions.png (the learned regions).

--model takes a zoo name (see `regproxy models`), a Hub repo id, a model directory or an authors' .pth file."""

EXAMPLES = """[bold]Examples[/]

  regproxy predict photo.jpg --model s16-ade

  regproxy predict photos/ 'more/*.png' --model s16-ade --out seg --regions --tta"""


def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image files, directories or glob patterns.")],
    model: ModelOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("predictions"),
    mode: ModeOption = None,
    scale: Annotated[float, typer.Option(help="Multiply the model's test scale.")] = 1.0,
    tta: TtaOption = False,
    regions: Annotated[bool, typer.Option("--regions", help="Also draw the learned regions.")] = False,
    device: DeviceOption = "auto",
    window_batch: WindowBatchOption = 8,
    precision: PrecisionOption = Precision.fp32,
    compile_network: CompileOption = False,
) -> None:
    check_window_batch(window_batch)
    torch_device = parse_device(device)
    run_precision = check_precision(precision, torch_device)
    paths, problems = expand_inputs(inputs)
    segmenter = load_model(model).to(torch_device)
    compile_if(compile_network, segmenter, run_precision)
    with tqdm(total=len(paths), unit="image", desc="segmenting", disable=not paths) as bar:
        report = predict_files(segmenter, paths, out, regions=regions, progress=bar.update,
                               mode=mode.value if mode else None, tta=tta, scale=scale, batch_size=window_batch,
                               precision=run_precision)
    for problem in problems + report.failed:
        err_console.print(f"[bold red]error:[/] {problem}", markup=True)
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
    return paths, problems


@dataclass
class PredictReport:
    written: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    pixels: Counter = field(default_factory=Counter)  # class id -> pixel count over all images
    images: Counter = field(default_factory=Counter)  # class id -> number of images it appears in


def predict_files(
    model: nn.Module,
    paths: list[Path],
    out_dir: Path,
    *,
    regions: bool = False,
    progress=None,
    **options,
) -> PredictReport:
    """Segment each image, writing ``<stem>.png`` (class ids, palette), ``<stem>_overlay.png`` and, with
    ``regions``, ``<stem>_regions.png``. A bad input is recorded and the rest still run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = np.array(model.config.palette, dtype=np.uint8)
    report = PredictReport()
    stems = Counter(p.stem for p in paths)
    for path in paths:
        try:
            image = load_image(path)
            labels = predict_labels(model, image, **options)
            stem = path.stem if stems[path.stem] == 1 else f"{path.parent.name}_{path.stem}"
            save_label_png(out_dir / f"{stem}.png", labels, palette)
            save_png_atomic(out_dir / f"{stem}_overlay.png", overlay(image, labels, palette))
            report.written.append(out_dir / f"{stem}.png")
            if regions:
                save_png_atomic(out_dir / f"{stem}_regions.png",
                                predict_regions(model, image, scale=options.get("scale", 1.0)))
            ids, counts = np.unique(labels, return_counts=True)
            report.pixels.update(dict(zip(ids.tolist(), counts.tolist())))
            report.images.update(ids.tolist())
        except RegproxyError as exc:
            report.failed.append(str(exc))
        if progress is not None:
            progress()
    return report
