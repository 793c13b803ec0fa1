"""``regproxy convert``: an authors' mmsegmentation checkpoint -> a regproxy model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from regproxy_cli.cli.options import Mode, parse_size
from regproxy_cli.cli.output import console, err_console
from regproxy_cli.errors import RegproxyError
from regproxy_cli.hub.zoo import ZOO  # torch-free: finding models needs no torch

SUMMARY = "Convert an authors' mmsegmentation checkpoint into a model directory."
HELP = """Convert an authors' mmsegmentation checkpoint (.pth from the RegionProxy release) into a model directory
(config.json + model.safetensors + README.md) that --model accepts and push_to_hub publishes.

Every key is mapped and shape-checked. With --zoo NAME the zoo entry's settings (classes, M, inference
protocol) are used; otherwise the architecture is read off the weights, and M and the test protocol (mode,
window stride, test scale) come from the options given, else the checkpoint's embedded mmseg config, else the
zoo entry with the same backbone, classes and crop.

With --all DIR (for maintainers mirroring the zoo), every zoo model whose authors' .pth is in the local cache
($REGPROXY_CACHE/authors/NAME.pth) is converted with its zoo settings into DIR/NAME/, and a table says which
were converted and where the missing files go."""

EXAMPLES = """[bold]Examples[/]

  regproxy convert regproxy-s16-ade.pth models/s16-ade --zoo s16-ade

  regproxy convert my_run.pth models/mine --backbone s16 --m 3

  regproxy convert my_run.pth models/mine --mode slide --window-stride 512 --test-scale 2048x1024

  regproxy convert --all mirror/"""


def convert(
    source: Annotated[Path | None, typer.Argument(
        help="The authors' .pth checkpoint.", show_default=False)] = None,
    destination: Annotated[Path | None, typer.Argument(
        help="Output model directory.", show_default=False)] = None,
    all_into: Annotated[Path | None, typer.Option(
        "--all", metavar="DIR", help="Convert every zoo model whose authors' .pth is in the local cache into DIR/NAME/."
    )] = None,
    zoo: Annotated[str | None, typer.Option(
        "--zoo", help=f"Take this zoo entry's settings: {', '.join(ZOO)}.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone name, when it cannot be told from the weights.")] = None,
    num_classes: Annotated[int | None, typer.Option(
        "--num-classes", help="Number of classes (checked against the weights).")] = None,
    m: Annotated[int | None, typer.Option(
        "--m", help="M, the token-head depth: blocks before the affinity tap (default: from the checkpoint)."
    )] = None,
    mode: Annotated[Mode | None, typer.Option(
        "--mode", help="whole | slide: how the model is tested (default: from the checkpoint or the zoo)."
    )] = None,
    window_stride: Annotated[int | None, typer.Option(
        "--window-stride", help="Sliding-window stride in pixels (default: from the checkpoint or the zoo).", min=1
    )] = None,
    test_scale: Annotated[str | None, typer.Option(
        "--test-scale", metavar="LONGxSHORT",
        help="Keep-ratio bound images are resized to for testing, e.g. 2048x1024 (default: from the checkpoint "
             "or the zoo)."
    )] = None,
) -> None:
    from regproxy_cli.hub.checkpoint import save_pretrained
    from regproxy_cli.hub.convert import convert_authors_checkpoint
    from regproxy_cli.hub.zoo import zoo_configs

    if all_into is not None:
        if source is not None:
            raise RegproxyError("--all DIR converts the cached zoo releases: give no SOURCE or DESTINATION with it")
        if zoo or backbone or num_classes or m is not None or mode or window_stride or test_scale:
            raise RegproxyError("--all DIR uses each zoo entry's settings: do not combine it with --zoo/--backbone/"
                                "--num-classes/--m/--mode/--window-stride/--test-scale")
        convert_all(all_into)
        return
    if source is None or destination is None:
        raise RegproxyError("give the authors' .pth SOURCE and the DESTINATION directory (or --all DIR)")
    if zoo is not None:
        if zoo not in ZOO:
            raise RegproxyError(f"unknown zoo model {zoo!r}; available: {', '.join(ZOO)}")
        if backbone or num_classes or m is not None or mode or window_stride or test_scale:
            raise RegproxyError("--zoo sets everything; do not combine it with --backbone/--num-classes/--m/"
                                "--mode/--window-stride/--test-scale")
        converted = convert_authors_checkpoint(source, ZOO[zoo].config())
    else:
        scale = None
        if test_scale is not None:
            sides = parse_size("--test-scale", test_scale)
            scale = (max(sides), min(sides))  # mmseg's keep-ratio bound: the order does not matter
        converted = convert_authors_checkpoint(
            source, known=zoo_configs(), backbone=backbone, num_classes=num_classes, m=m,
            inference_mode=mode.value if mode else None, window_stride=window_stride, test_scale=scale,
        )
    save_pretrained(converted, destination)
    config = converted.config
    console.print(f"wrote {destination} ({config.backbone}, M={config.m}, {config.num_classes} classes, "
                  f"{sum(p.numel() for p in converted.parameters()) / 1e6:.2f} M parameters)")


def convert_all(directory: Path) -> None:
    from regproxy_cli.hub.zoo import authors_checkpoint_path, convert_cached_releases

    with err_console.status(f"converting the cached authors' releases into {directory}"):
        written = convert_cached_releases(directory)
    table = Table(title=f"Zoo models converted into {directory}")
    for column in ("model", "status", "model directory / where the authors' .pth goes"):
        table.add_column(column)
    for name, out in written.items():
        if out is not None:
            table.add_row(name, "[green]converted[/]", str(out))
        else:
            table.add_row(name, "[yellow]missing[/]",
                          f"download {ZOO[name].authors_url} to {authors_checkpoint_path(ZOO[name])}")
    console.print(table)
    converted = sum(out is not None for out in written.values())
    console.print(f"{converted} converted, {len(written) - converted} missing")
