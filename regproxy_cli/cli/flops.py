"""``regproxy flops``: parameters and FLOPs of every backbone, next to the paper's figures."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from regproxy_cli.classes import ADE20K_CLASSES
from regproxy_cli.cli.options import JsonOption, parse_size
from regproxy_cli.cli.output import console, print_json
from regproxy_cli.errors import RegproxyError

SUMMARY = "Count parameters and FLOPs, next to the paper's figures."
HELP = """Count parameters and FLOPs (multiply-adds, as the paper) of RegProxy models or their linear baselines.

Two counts: [bold]paper[/] follows the convention of the paper's tables (mmcv's counter, which skips
everything inside attention); [bold]true[/] counts every matrix product, attention and painting included.
Counting runs on meta tensors: no weights are allocated.

--plot FILE draws the paper's Fig. 2: mIoU against GFLOPs for the zoo models of --dataset (the paper's single-scale
mIoU) and for each --run DIR (an eval --report folder, or a training run / model directory with eval.json or
its own validation mIoU), GFLOPs counted at each model's crop size. Needs matplotlib: pip install 'regproxy[report]'."""

EXAMPLES = """[bold]Examples[/]

  regproxy flops                                   # all backbones at their ADE20K crop, 150 classes

  regproxy flops -b s16 --region-res 16 --json

  regproxy flops --baseline                        # the linear baselines of Table 3

  regproxy flops --size 768 --num-classes 19 --slide-image 1024x2048 --slide-stride 512   # Table 5

  regproxy flops --plot fig2.png --run runs/demo --log-x         # the paper's Fig. 2, and your run on it"""

ZooDataset = Enum("ZooDataset", {name: name for name in ("ade20k", "cityscapes", "none")}, type=str)


def flops(
    backbone: Annotated[
        list[str] | None, typer.Option("--backbone", "-b", help="Backbone name (repeatable); default: all installed.")
    ] = None,
    size: Annotated[
        int | None, typer.Option(help="Square input size; default: each backbone's paper crop (512, or 640 for L).")
    ] = None,
    num_classes: Annotated[int, typer.Option("--num-classes", help="Number of classes K.")] = len(ADE20K_CLASSES),
    region_res: Annotated[str, typer.Option(help="Region resolution h or hxw (1..16): output stride = stride / h.")] = "4",
    baseline: Annotated[bool, typer.Option("--baseline", help="Count the linear baselines instead.")] = False,
    slide_image: Annotated[
        str | None, typer.Option(help="Report totals over sliding windows of --size covering this HEIGHTxWIDTH image.")
    ] = None,
    slide_stride: Annotated[int | None, typer.Option(help="Sliding-window stride; default: --size.")] = None,
    as_json: JsonOption = False,
    plot: Annotated[
        Path | None, typer.Option(help="Draw mIoU against GFLOPs (the paper's Fig. 2) into this PNG instead.")
    ] = None,
    run: Annotated[
        list[Path] | None, typer.Option("--run", help="With --plot: an evaluated run or report folder (repeatable).")
    ] = None,
    dataset: Annotated[ZooDataset, typer.Option(help="With --plot: the zoo models of this dataset.")] = ZooDataset.ade20k,
    log_x: Annotated[bool, typer.Option("--log-x", help="With --plot: logarithmic GFLOPs axis.")] = False,
) -> None:
    from regproxy_cli.model.flops import flops_rows
    from regproxy_cli.model.regproxy import parse_region_res

    if plot is not None:
        _plot(plot, run or [], dataset, log_x, as_json, conflicts={
            "--backbone": bool(backbone), "--size": size is not None, "--num-classes": num_classes != len(ADE20K_CLASSES),
            "--region-res": region_res != "4", "--baseline": baseline, "--slide-image": slide_image is not None,
            "--slide-stride": slide_stride is not None})
        return
    for option, given in (("--run", bool(run)), ("--dataset", dataset != ZooDataset.ade20k), ("--log-x", log_x)):
        if given:
            raise RegproxyError(f"{option} needs --plot FILE")
    region = parse_region_res(region_res)
    image = parse_size("--slide-image", slide_image) if slide_image else None
    if num_classes < 1:
        raise RegproxyError(f"--num-classes must be at least 1, got {num_classes}")
    rows = flops_rows(backbone, size=size, classes=num_classes, region_res=region, baseline=baseline, slide_image=image,
                      slide_stride=slide_stride)
    if as_json:
        print_json(rows)
        return
    _print_table(rows, image)


def _plot(path: Path, runs: list[Path], zoo: ZooDataset, log_x: bool, as_json: bool,
          conflicts: dict[str, bool]) -> None:
    from regproxy_cli.engine.report import flops_points, plot_flops

    given = [option for option, used in conflicts.items() if used]
    if given:  # the figure counts each model at its own crop, classes and region resolution
        raise RegproxyError(f"--plot counts every model as it is configured; drop {', '.join(given)}")
    points = flops_points(runs, None if zoo == ZooDataset.none else zoo.value)
    if not points:
        raise RegproxyError("--plot: nothing to draw (--dataset none and no --run)")
    plot_flops(points, path, log_x=log_x)
    if as_json:
        print_json(points)
        return
    table = Table(title="mIoU against GFLOPs", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    for column in ("model", "GFLOPs", "mIoU", "mIoU from"):
        table.add_column(column, justify="right" if column in ("GFLOPs", "mIoU") else "left")
    for p in points:
        table.add_row(p["label"], f"{p['gflops']:.1f}", f"{p['miou']:.2f}", p["source"])
    console.print(table)
    console.print(f"wrote {path}")


def _delta(ours: float, theirs: float) -> str:
    return f"{100 * (ours - theirs) / theirs:+.1f}"


def _print_table(rows: list[dict], image: tuple[int, int] | None) -> None:
    where = f"summed over the sliding windows of a {image[0]}x{image[1]} image" if image else "one forward pass"
    table = Table(title=f"{rows[0]['model']}: parameters and GFLOPs (multiply-adds), {where}", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    for column in ("backbone", "input", "GFLOPs", "true", "stem", "paper", "Δ%", "params", "paper", "Δ%"):
        table.add_column(column, justify="left" if column == "backbone" else "right", no_wrap=True)
    notes, sources = [], set()
    for r in rows:
        ref = r["paper"]
        gflops, mparams = r["paper_macs"] / 1e9, r["params"] / 1e6
        paper_cells = ["-"] * 4  # paper GFLOPs, delta, paper params, delta
        if ref:
            sources.add(ref["source"])
            paper_cells = [f"{ref['gflops']:g}", _delta(gflops, ref["gflops"]), f"{ref['mparams']:g}",
                           _delta(mparams, ref["mparams"])]
            if ref["note"]:
                notes.append(f"{r['title']}: the {ref['note']}; ours counts it "
                             f"({gflops - r['stem_paper_macs'] / 1e9:.1f} G without it).")
        table.add_row(
            r["title"], f"{r['size']}²" + (f"x{r['windows']}" if image else ""), f"{gflops:.1f}",
            f"{r['true_macs'] / 1e9:.1f}", f"{r['stem_paper_macs'] / 1e9:.1f}" if r["stem_paper_macs"] else "-",
            *paper_cells[:2], f"{mparams:.1f}", *paper_cells[2:],
        )
    console.print(table)
    console.print(
        "GFLOPs: the paper's convention (mmcv's counter on the authors' model, which skips attention). "
        "true: every matrix product, attention and painting included. "
        "stem: the CNN stem's part of GFLOPs (included in both). "
        + "params: millions. "
        + (f"paper: {', '.join(sorted(sources))} of the paper; Δ%: ours against it." if sources else "")
    )
    for note in notes:
        console.print(f"note: {note}")
