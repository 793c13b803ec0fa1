"""``regproxy export``: a model -> an ONNX file, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from regproxy_cli.cli.options import DeviceOption, ModelOption, check_batch, parse_device, parse_size
from regproxy_cli.cli.output import console, err_console
from regproxy_cli.constants import MAX_OPSET, MIN_OPSET
from regproxy_cli.errors import RegproxyError

if TYPE_CHECKING:
    from regproxy_cli.onnx.export import CalibrationSet

CHECK_TOLERANCE = 1e-4  # largest |ONNX - PyTorch| logit difference --check accepts (fp32)

SUMMARY = "Export a model to ONNX, checked against PyTorch with onnxruntime."
HELP = """Export a model to ONNX (needs the 'export' extra: pip install 'regproxy\\[export]'). The file takes
"image", a normalised float32 (B, 3, H, W) RGB batch, and returns "logits" (B, K, H, W); batch, height and width
are dynamic unless --static. The model's config (classes, palette, mean/std, inference protocol) is stored in
the file's metadata.

--model takes a zoo name (see `regproxy models`), a Hub repo id, a model directory or an authors' .pth file.
--check (on by default) runs the file with onnxruntime on a random input and fails if its logits differ from
PyTorch's by more than 1e-4. The model is traced on --device (default cpu).

--quantize int8 --calibration DIR writes OUT as a static int8 model (onnxruntime, QDQ, per-channel int8 weights
of the Conv/MatMul/Gemm operators, int8 activations with min/max ranges), calibrated on up to
--calibration-images images of DIR: each one whole, normalised as predict does and resized to the export size
(the crop size by default; the aspect ratio is not kept). The table reports how many pixels' labels the int8 model
shares with the fp32 one on those images (each segmented with the model's own test protocol) and, when DIR is a
dataset folder (its val split), both models' mIoU on them (optimistic: the same images set the ranges)."""

EXAMPLES = """[bold]Examples[/]

  regproxy export --model s16-ade s16-ade.onnx

  regproxy export --model runs/demo/best demo.onnx --size 512x683 --batch 2 --static

  regproxy export --model runs/demo/best demo-int8.onnx --quantize int8 --calibration data/synthetic"""


Quantization = Enum("Quantization", {"int8": "int8"}, type=str)  # what --quantize makes of the exported model


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
    quantize: Annotated[Quantization | None, typer.Option(help="Write OUT quantized: int8 (static, calibrated on "
                                                                "--calibration).")] = None,
    calibration: Annotated[Path | None, typer.Option(
        help="--quantize: a folder of images, or a dataset folder (its val split, labels give the mIoU change)."
    )] = None,
    calibration_images: Annotated[int, typer.Option(help="--quantize: calibrate on at most this many images.")] = 32,
    device: DeviceOption = "cpu",
) -> None:
    from regproxy_cli.hub.zoo import load_model
    from regproxy_cli.onnx.export import CalibrationSet

    height, width = parse_size("--size", size, square=True) if size else (None, None)
    check_batch(batch)
    if (quantize is None) != (calibration is None):
        raise RegproxyError("--quantize int8 and --calibration DIR go together: the calibration images set the "
                            "int8 ranges")
    if quantize and static and batch != 1:
        raise RegproxyError("--quantize calibrates on one image at a time: use --batch 1 with --static")
    torch_device = parse_device(device)
    samples = CalibrationSet(calibration, calibration_images) if calibration is not None else None
    segmenter = load_model(model).to(torch_device)
    if height is None:
        height = width = int(getattr(segmenter.config, "crop_size", 512))
    with tempfile.TemporaryDirectory(prefix="regproxy-export-") as tmp:
        # quantizing: the fp32 export is only the quantizer's input and the reference, so it goes to tmp
        exported = Path(tmp) / "fp32.onnx" if quantize else output
        _export(segmenter, exported, model, height, width, batch, opset, static, check, reference=bool(quantize))
        if quantize:
            _quantize(exported, output, samples, (height, width))
    console.print(f"wrote {output}")


def _export(segmenter, output: Path, model: str, height: int, width: int, batch: int, opset: int, static: bool,
            check: bool, reference: bool = False) -> None:
    """The fp32 export, its table, and the check against PyTorch (``reference``: a temporary file to quantize)."""
    import torch

    from regproxy_cli.onnx.export import check_onnx, export_onnx

    started = time.perf_counter()
    export_onnx(segmenter, output, size=(height, width), batch=batch, opset=opset, dynamic=not static)
    export_seconds = time.perf_counter() - started

    table = Table(title=f"ONNX export of {model}", box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    where = "fp32, temporary: the reference for int8" if reference else str(output)
    table.add_row("file", f"{where} ({output.stat().st_size / 2**20:.1f} MiB, opset {opset})")
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
        raise RegproxyError(f"ONNX logits differ from PyTorch's by {difference:.2e} > {CHECK_TOLERANCE:g}; " + (
            "nothing was quantized" if reference else f"{output} was written but should not be trusted"))


def _quantize(fp32_path: Path, output: Path, samples: CalibrationSet, size: tuple[int, int]) -> None:
    from regproxy_cli.engine.evaluate import compare_onnx_models
    from regproxy_cli.onnx.export import QUANTIZED_OPS, quantize_int8

    started = time.perf_counter()
    with err_console.status(f"calibrating int8 ranges on {len(samples)} images"):
        quantize_int8(fp32_path, output, samples, size=size)
    seconds = time.perf_counter() - started
    with err_console.status("comparing the int8 model's labels with the fp32 model's"):
        agreement, scores = compare_onnx_models(fp32_path, output, samples)

    table = Table(title="int8 quantization", box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("file", f"{output} ({output.stat().st_size / 2**20:.1f} MiB; fp32 "
                          f"{fp32_path.stat().st_size / 2**20:.1f} MiB)")
    table.add_row("method", f"static int8, QDQ, per-channel weights, {'/'.join(QUANTIZED_OPS)} ({seconds:.1f} s)")
    table.add_row("calibration", f"{len(samples)} images of {samples.folder}"
                                 f"{' (val split)' if samples.labelled else ''}, whole, resized to {size[0]}x{size[1]}")
    table.add_row("agreement", f"{agreement:.2f}% of pixels have the fp32 model's label ({len(samples)} images)")
    if scores is not None:
        table.add_row("mIoU", f"fp32 {scores[0]:.2f}, int8 {scores[1]:.2f} ({scores[1] - scores[0]:+.2f}) "
                              "on the calibration images")
    console.print(table)
