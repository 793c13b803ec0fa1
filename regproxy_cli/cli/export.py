"""``regproxy export``: a model -> an ONNX file, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from regproxy_cli.cli.options import ModelOption, parse_size
from regproxy_cli.cli.output import console
from regproxy_cli.errors import RegproxyError
from regproxy_cli.io.export import MAX_OPSET, MIN_OPSET, check_onnx, export_onnx
from regproxy_cli.io.zoo import load_model

CHECK_TOLERANCE = 1e-4  # largest |ONNX - PyTorch| logit difference --check accepts (fp32)

SUMMARY = "Export a model to ONNX, checked against PyTorch with onnxruntime."
HELP = """Export a model to ONNX (needs the 'export' extra: pip install 'regproxy\\[export]'). The file takes
"image", a normalised float32 (B, 3, H, W) RGB batch, and returns "logits" (B, K, H, W); batch, height and width
are dynamic unless --static. The model's config (classes, palette, mean/std, inference protocol) is stored in
the file's metadata.

--model takes a zoo name (see `regproxy models`), a Hub repo id, a model directory or an authors' .pth file.
--check (on by default) runs the file with onnxruntime on a random input and fails if its logits differ from
PyTorch's by more than 1e-4."""

EXAMPLES = """[bold]Examples[/]

  regproxy export --model s16-ade s16-ade.onnx

  regproxy export --model runs/demo/best demo.onnx --size 512x683 --batch 2 --static"""


def export(
    output: Annotated[Path, typer.Argument(help="The .onnx file to write.")],
    model: ModelOption,
    size: Annotated[str | None, typer.Option(
        help="Example input size, N or HxW (default: the model's crop size); with --static the only size accepted."
    )] = None,
    batch: Annotated[int, typer.Option(help="Example batch; with --static the only batch accepted.")] = 1,
    opset: Annotated[int, typer.Option(help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET}.")] = 17,
    static: Annotated[bool, typer.Option("--static", help="Fix batch and size instead of dynamic axes.")] = False,
    check: Annotated[bool, typer.Option(help="Compare onnxruntime's logits with PyTorch's on a random input.")] = True,
) -> None:
    height, width = parse_size("--size", size, square=True) if size else (None, None)
    if batch < 1:
        raise RegproxyError(f"--batch must be at least 1, got {batch}")
    segmenter = load_model(model)
    if height is None:
        height = width = int(getattr(segmenter.config, "crop_size", 512))
    started = time.perf_counter()
    export_onnx(segmenter, output, size=(height, width), batch=batch, opset=opset, dynamic=not static)
    export_seconds = time.perf_counter() - started

    table = Table(title=f"ONNX export of {model}", box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("file", f"{output} ({output.stat().st_size / 2**20:.1f} MiB, opset {opset})")
    shape = f"{batch}x3x{height}x{width}, fixed (--static)" if static else "batch x 3 x height x width, dynamic"
    table.add_row("input", f"image: float32 {shape}")
    table.add_row("export", f"{export_seconds:.1f} s")
    difference = None
    if check:
        started = time.perf_counter()
        difference = check_onnx(output, segmenter, torch.randn(batch, 3, height, width))
        table.add_row("check", f"max |ONNX - PyTorch| = {difference:.2e} on {batch}x3x{height}x{width} "
                               f"({time.perf_counter() - started:.1f} s)")
    console.print(table)
    if difference is not None and not difference <= CHECK_TOLERANCE:  # `not <=` also catches NaN
        raise RegproxyError(f"ONNX logits differ from PyTorch's by {difference:.2e} > {CHECK_TOLERANCE:g}; "
                            f"{output} was written but should not be trusted")
    console.print(f"wrote {output}")
