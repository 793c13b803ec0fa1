"""``regproxy data``: know a dataset (``stats``) and bring annotation-tool exports into the folder format
(``import``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from regproxy_cli.cli.data_import import IMPORT_EXAMPLES, IMPORT_HELP, IMPORT_SUMMARY, import_command
from regproxy_cli.cli.options import JsonOption
from regproxy_cli.cli.output import console, print_json
from regproxy_cli.errors import RegproxyError

if TYPE_CHECKING:
    from regproxy_cli.data.stats import SplitStats

SUMMARY = "Dataset tools: class statistics and problem masks (stats), annotation-tool exports in (import)."
HELP = """Dataset tools. `regproxy data stats` reads every mask of a dataset and reports the classes' pixel share
and image count, the image sizes, the suggested class weights and every mask it cannot use; `regproxy data import`
turns a labelme, COCO, CVAT or Pascal VOC export into the folder format that train and eval read."""

STATS_SUMMARY = "Per-class pixel share and image count, image sizes, suggested class weights, problem masks."
STATS_HELP = """Statistics of a dataset: a training config (its data section) or a dataset folder (ADE20K,
Cityscapes, Pascal Context, CamVid or the folder format; detected). For each split: every class's share of the
labelled pixels, the number of images it occurs in and the suggested class weight (median-frequency balancing), the
ignored pixels and the image sizes. Masks are read as training reads them, so the ids are the train ids.

Every mask that is unreadable, whose size differs from its image's, or that holds a value that is neither a class
id nor 255 is listed with its path and left out of the counts; the exit code is then 1."""
STATS_EXAMPLES = """[bold]Examples[/]

  regproxy data stats data/CamVid

  regproxy data stats configs/camvid-cpu.yaml --split train --json"""


app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
                  add_completion=False)


def _unwrap(text: str) -> str:
    """Help texts are wrapped in the source; let the terminal wrap them (paragraphs stay)."""
    return re.sub(r"(?<!\n)\n(?!\n)", " ", text)


def stats(
    data: Annotated[str, typer.Argument(metavar="CONFIG|PATH", help="Training config (.yaml) or dataset folder.",
                                         show_default=False)],
    split: Annotated[list[str] | None, typer.Option(
        "--split", help="A split to read (repeatable; default: every split with annotations).")] = None,
    workers: Annotated[int, typer.Option(help="Threads reading masks.")] = 4,
    as_json: JsonOption = False,
) -> None:
    from regproxy_cli.data.class_weights import CLASS_WEIGHT_FORMULA
    from regproxy_cli.data.stats import dataset_stats

    kind, root = _dataset_location(data)
    found = dataset_stats(kind, root, split or None, progress=not as_json, workers=workers)
    problems = [p for s in found for p in s.problems]
    if as_json:
        print_json({"data": data, "weight_formula": CLASS_WEIGHT_FORMULA, "splits": [s.to_dict() for s in found]})
    else:
        for split_stats in found:
            _print_split(split_stats)
        console.print(f"weight: {CLASS_WEIGHT_FORMULA}")
    if problems:
        raise RegproxyError(f"{len(problems)} problem(s) in {len({p.path for p in problems})} file(s) "
                            f"(listed {'in the JSON' if as_json else 'above'}; left out of the counts)")


def _dataset_location(data: str) -> tuple[str, str]:
    """(kind, root) of ``--data``: a config's data section (synthetic scenes generated first) or a folder."""
    from regproxy_cli.engine.config import load_config

    path = Path(data)
    if path.suffix in (".yaml", ".yml"):
        section = load_config(path).data
        if section.kind == "synthetic":
            section.open(section.train_split)  # generates the scenes once; they are a folder dataset
            return "folder", section.root
        return section.kind, section.root
    if not path.is_dir():
        raise RegproxyError(f"{data}: not a config file or a dataset folder")
    return "auto", data


def _print_split(found: SplitStats) -> None:
    summary = found.to_dict()
    sizes = ", ".join(f"{s['width']}x{s['height']} ({s['images']})" for s in summary["sizes"][:4])
    if len(summary["sizes"]) > 4:
        sizes += f", {len(summary['sizes']) - 4} more sizes"
    table = Table(title=f"{found.split}: {found.images} images, {summary['ignored_percent']:.1f}% of pixels ignored",
                  box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False, title_justify="left")
    for column in ("id", "class", "pixels %", "images", "weight"):
        table.add_column(column, justify="left" if column == "class" else "right", no_wrap=True)
    for row in summary["classes"]:
        share = f"{row['pixel_percent']:.2f}" if row["pixels"] else "-"
        table.add_row(str(row["id"]), escape(row["name"]), share, str(row["images"]), f"{row['weight']:.2f}")
    console.print(table)
    console.print(f"image sizes (width x height): {sizes or '-'}")
    if found.problems:
        problems = Table(title=f"{found.split}: {len(found.problems)} problem(s), left out of the counts",
                         box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False, title_justify="left")
        for column in ("kind", "file", "detail"):
            problems.add_column(column, overflow="fold")
        for problem in found.problems:
            problems.add_row(problem.kind, escape(problem.path), escape(problem.message))
        console.print(problems)
    console.print()


app.command("stats", help=_unwrap(STATS_HELP), short_help=STATS_SUMMARY, epilog=STATS_EXAMPLES)(stats)
app.command("import", help=_unwrap(IMPORT_HELP), short_help=IMPORT_SUMMARY, epilog=IMPORT_EXAMPLES)(import_command)
