"""``regproxy predict``: segment images into label PNGs, colour overlays and region pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from tqdm import tqdm

from regproxy_cli.cli.options import COMPILE_HELP, PRECISION_HELP, check_precision, compile_if, parse_device
from regproxy_cli.cli.output import console, err_console
from regproxy_cli.errors import RegproxyError
from regproxy_cli.predict import expand_inputs, predict_files
from regproxy_cli.zoo import load_model

HELP = """Segment images: files, directories and glob patterns. For each image writes OUT/<name>.png (class ids,
palette-coloured), OUT/<name>_overlay.png and, with --regions, OUT/<name>_regions.png (the learned regions).

--model takes a zoo name (see `regproxy models`), a Hub repo id, a model directory or an authors' .pth file."""

EXAMPLES = """[bold]Examples[/]

  regproxy predict photo.jpg --model s16-ade

  regproxy predict photos/ 'more/*.png' --model s16-ade --out seg --regions --tta"""


def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image files, directories or glob patterns.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo name, Hub repo id, model directory or .pth file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("predictions"),
    mode: Annotated[str | None, typer.Option(help="whole | slide (default: the model's protocol).")] = None,
    scale: Annotated[float, typer.Option(help="Multiply the model's test scale.")] = 1.0,
    tta: Annotated[bool, typer.Option("--tta", help="Multi-scale (0.5-1.75) + flip test-time augmentation.")] = False,
    regions: Annotated[bool, typer.Option("--regions", help="Also draw the learned regions.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps ...")] = "cpu",
    batch: Annotated[int, typer.Option(help="Sliding windows per forward pass (on a CPU the network still runs them one at a time, which is faster there).")] = 8,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "fp32",
    compile_network: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
) -> None:
    if batch < 1:
        raise RegproxyError(f"--batch must be at least 1, got {batch}")
    torch_device = parse_device(device)
    check_precision(precision, torch_device)
    paths, problems = expand_inputs(inputs)
    segmenter = load_model(model).to(torch_device)
    compile_if(compile_network, segmenter, precision)
    with tqdm(total=len(paths), unit="image", desc="segmenting", disable=not paths) as bar:
        report = predict_files(segmenter, paths, out, regions=regions, progress=bar.update, mode=mode, tta=tta,
                               scale=scale, batch_size=batch, precision=precision)
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
