"""``regproxy analyze``: studies of what a trained model learned (``regions``: the paper's Fig. 6 region entropy)."""

from __future__ import annotations

from pathlib import Path
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
    model_device,
    parse_device,
)
from regproxy_cli.cli.output import console, print_json
from regproxy_cli.errors import RegproxyError

SUMMARY = "Analyses of a trained model: region entropy of the learned regions (regions)."
HELP = "Analyses of a trained model. `regproxy analyze regions` redraws the paper's Fig. 6 (left) on your data."

REGIONS_SUMMARY = "How pure the learned regions are: region entropy against regular cells (the paper's Fig. 6)."
REGIONS_HELP = """The paper's region-entropy analysis (Sec. 5.4, Fig. 6 left) over a dataset: every token's learned
region is the pixels whose highest affinity is to it (soft: every pixel weighted by its affinity); its class
histogram (ground-truth labels, the paper's Eq. 1) has an entropy, 0 for a region inside one object. The same is
computed for the regular cells a conventional model classifies (each token's own stride x stride square). Writes OUT/region_entropy.json (regions, share of pure ones, mean and median of
the non-zero entropies) and OUT/region_entropy.png (their distributions, KDE, zeros left out as in the paper).
Needs a RegProxy model and matplotlib (pip install 'regproxy[report]')."""
REGIONS_EXAMPLES = """[bold]Examples[/]

  regproxy analyze regions --model runs/demo/best --data configs/demo.yaml --out runs/demo/analysis

  regproxy analyze regions --model s16-ade --data /data/ADEChallengeData2016 --limit 500"""

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
                  add_completion=False)


def regions(
    model: ModelOption,
    data: Annotated[str, typer.Option(help="Training config (.yaml) or dataset folder.")],
    split: Annotated[str | None, typer.Option(help="Dataset split (default: the config's val split, or val).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("analysis"),
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N images.")] = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.fp32,
    as_json: JsonOption = False,
) -> None:
    from regproxy_cli.engine.analyze import SOURCES, region_entropy, write_region_entropy
    from regproxy_cli.engine.evaluate import open_eval_dataset
    from regproxy_cli.hub.zoo import load_model
    from regproxy_cli.inference.quantize import quantize_int8
    from regproxy_cli.plots import require_matplotlib

    require_matplotlib("analyze regions")  # before the pass over the dataset
    torch_device = parse_device(model_device(device, model))
    run_precision = check_precision(precision, torch_device)
    dataset = open_eval_dataset(data, split)
    segmenter = load_model(model)
    if not segmenter.has_regions:
        raise RegproxyError(f"{model}: analyze regions needs a RegProxy model (this one has no learned regions)")
    segmenter = segmenter.to(torch_device)
    if run_precision == "int8":
        quantize_int8(segmenter)
    result = region_entropy(segmenter, dataset, limit=limit, progress=not as_json, precision=run_precision)
    written = write_region_entropy(result, out, title=f"Region entropy: {model}, {result.images} images")
    summary = result.summary()
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"Region entropy (nats; at most ln {result.classes} = {summary['max_entropy']:.2f})",
                  box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    for column in ("source", "regions", "pure %", "mean", "mean (non-zero)", "median (non-zero)"):
        table.add_column(column, justify="left" if column == "source" else "right")
    names = {"learned": "learned regions", "soft": "learned, soft", "cells": "regular cells"}
    for source in SOURCES:
        s = summary[source]
        table.add_row(names[source], f"{s['regions']:,}", "-" if s["pure_share"] is None else f"{100 * s['pure_share']:.1f}",
                      *("-" if s[k] is None else f"{s[k]:.3f}" for k in ("mean", "mean_nonzero", "median_nonzero")))
    console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in written))


app.command("regions", help=REGIONS_HELP.replace("\n", " "), short_help=REGIONS_SUMMARY,
            epilog=REGIONS_EXAMPLES)(regions)
