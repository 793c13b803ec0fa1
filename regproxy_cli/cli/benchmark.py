"""``regproxy benchmark``: how fast a model turns images into label maps on this machine."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from regproxy_cli.cli.options import (
    DeviceOption,
    JsonOption,
    ModelOption,
    Precision,
    PrecisionOption,
    check_precision,
    parse_device,
    parse_size,
)
from regproxy_cli.cli.output import console, print_json
from regproxy_cli.errors import RegproxyError

SUMMARY = "Time a model's image -> label map step on this machine (images/s, ms/image)."
HELP = """Time a model's image -> label map step (the network and the label resize, whole mode, no sliding windows)
on a random input of --size: --warmup untimed calls, then --iters timed ones, synchronised on CUDA. Reports
images/s, ms/image (median, min, max), the device, the torch version and, on CUDA, the peak memory allocated.
Decoding and writing files are not included (see `regproxy predict` for whole folders).

--model takes a zoo name (see `regproxy models`), a Hub repo id, a model directory or an authors' .pth file."""

EXAMPLES = """[bold]Examples[/]

  regproxy benchmark --model s16-ade

  regproxy benchmark --model runs/demo/best --size 512x683 --iters 50 --json

  regproxy benchmark --model s16-ade --device cuda --batch 8 --precision fp16"""


def benchmark(
    model: ModelOption,
    size: Annotated[str | None, typer.Option(help="Input size N or HEIGHTxWIDTH; default: the model's crop.")] = None,
    batch: Annotated[int, typer.Option(help="Images per forward pass (a CPU still runs them one at a time).")] = 1,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.fp32,
    iters: Annotated[int, typer.Option(help="Timed calls.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing.")] = 3,
    as_json: JsonOption = False,
) -> None:
    from regproxy_cli.hub.zoo import load_model
    from regproxy_cli.inference.benchmark import benchmark_labels
    from regproxy_cli.inference.quantize import quantize_int8

    sides = parse_size("--size", size, square=True) if size is not None else None
    for option, value, least in (("--batch", batch, 1), ("--iters", iters, 1), ("--warmup", warmup, 0)):
        if value < least:
            raise RegproxyError(f"{option} must be at least {least}, got {value}")
    torch_device = parse_device(device)
    run_precision = check_precision(precision, torch_device)
    segmenter = load_model(model).to(torch_device)
    if run_precision == "int8":
        quantize_int8(segmenter)
    result = benchmark_labels(segmenter, size=sides, batch=batch, iters=iters, warmup=warmup, precision=run_precision)
    if as_json:
        print_json({"model": model, **result.as_dict()})
        return
    table = Table(title=f"{model}: image -> label map, {result.size[0]}x{result.size[1]}, batch {result.batch}, "
                  f"{result.precision}", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    for column in ("images/s", "ms/image median", "min", "max"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.images_per_s:.2f}", f"{result.ms_per_image_median:.1f}", f"{result.ms_per_image_min:.1f}",
                  f"{result.ms_per_image_max:.1f}")
    console.print(table)
    memory = (f", peak memory allocated {result.max_memory_allocated / 2**20:.0f} MiB"
              if result.max_memory_allocated is not None else "")
    console.print(f"{result.device} ({result.device_name}), {result.threads} torch threads, torch "
                  f"{result.torch_version}; {result.warmup} warm-up + {result.iters} timed calls{memory}")
    if result.attention is not None:
        how = ("in CPU bf16 the faster of the two on this machine, measured once and cached, unless "
               "REGPROXY_ATTENTION sets it" if result.precision == "bf16" and result.device == "cpu" else "timm's choice")
        console.print(f"attention kernel: {result.attention} ({how})")
    if result.fast_path is not None:
        fastest, why = result.fast_path
        console.print(f"default precision: fp32 everywhere (the published mIoU, the same labels on every machine); "
                      f"fastest on this CPU: --precision {fastest} ({why})")
