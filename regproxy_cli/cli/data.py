"""``regproxy data``: know a dataset (``stats``) and bring annotation-tool exports into the folder format
(``import``)."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from regproxy_cli.cli.options import JsonOption
from regproxy_cli.cli.output import console, err_console, print_json
from regproxy_cli.data.class_weights import CLASS_WEIGHT_FORMULA
from regproxy_cli.data.formats import import_annotations
from regproxy_cli.data.stats import SplitStats, dataset_stats
from regproxy_cli.engine.config import load_config
from regproxy_cli.errors import RegproxyError

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

IMPORT_SUMMARY = "Convert a labelme, COCO, CVAT or Pascal VOC export into the folder dataset format."
IMPORT_HELP = """Convert an annotation-tool export SRC into a folder dataset DST (classes.yaml with a palette,
images/{train,val}, masks/{train,val}) that train and eval read.

--from labelme: a folder of labelme JSON files (shapes painted in file order; __ignore__ paints 255).

--from coco: a COCO instances JSON (polygons, holes as pycocotools rasterises them, and RLEs, iscrowd included).

--from cvat: CVAT for images 1.1 (annotations.xml, or a folder or zip holding it; polygons, boxes, ellipses and masks
by z_order) or a Segmentation mask 1.1 zip (what predict --format cvat writes).

--from voc: a Pascal VOC folder (SegmentationClass palette PNGs, 255 ignored; its train/val lists kept).

Pixels no shape covers are ignored (255) unless --background names their class. Without a source split, a seeded
--val-fraction of the images goes to val. A label that is not a class, a broken polygon or a missing image stops
with one line naming the file, and nothing is written: the dataset is built beside DST and renamed at the end."""
IMPORT_EXAMPLES = """[bold]Examples[/]

  regproxy data import --from labelme annotations/ data/mine

  regproxy data import --from coco instances.json data/mine --images photos/ --classes road,car,person

  regproxy data import --from cvat task.zip data/mine --background background --val-fraction 0.1 --seed 1

  regproxy data import --from voc VOCdevkit/ data/voc"""


class SourceFormat(str, Enum):
    """The annotation formats ``data import`` reads."""

    labelme = "labelme"
    coco = "coco"
    cvat = "cvat"
    voc = "voc"


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


def import_command(
    source: Annotated[Path, typer.Argument(
        metavar="SRC", help="The export: a folder, JSON, XML or zip (see above).", show_default=False)],
    destination: Annotated[Path, typer.Argument(metavar="DST", help="The dataset folder to create.",
                                                show_default=False)],
    source_format: Annotated[SourceFormat, typer.Option("--from", help="The export's format.", show_default=False)],
    images: Annotated[Path | None, typer.Option(
        help="Where the pictures are, when the export only names them (default: beside the annotation file).")] = None,
    classes: Annotated[str | None, typer.Option(
        help="Class names in id order: a,b,c, a classes.yaml (its palette too) or a .txt with one per line. A label "
             "outside them is an error (default: the export's own).")] = None,
    background: Annotated[str | None, typer.Option(
        help="The class of pixels no shape covers (default: ignored, 255).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of images drawn into val when the export has no split.")
                            ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the train/val draw.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace DST when it is not empty.")] = False,
    allow_outside_paths: Annotated[bool, typer.Option(
        "--allow-outside-paths", help="Read pictures the export names by an absolute or '..' path where they point "
        "(default: only under SRC or --images, by file name).")] = False,
    as_json: JsonOption = False,
) -> None:
    result = import_annotations(source_format.value, source, destination, images=images, classes=classes,
                                background=background, val_fraction=val_fraction, seed=seed, force=force,
                                progress=not as_json, allow_outside_paths=allow_outside_paths)
    if as_json:
        print_json(result.to_dict())
        return
    per_split = ", ".join(f"{count} {split}" for split, count in result.images.items())
    console.print(f"imported {sum(result.images.values())} images ({per_split}) of {len(result.classes)} classes "
                  f"into {escape(str(result.destination))}")
    console.print(f"classes: {escape(', '.join(result.classes))}")
    if result.skipped:
        shapes = ", ".join(f"{count} {kind}" for kind, count in sorted(result.skipped.items()))
        err_console.print(f"left out (no area): {shapes}")
    if result.unlabelled:
        err_console.print(f"{len(result.unlabelled)} image(s) have no labelled pixel, e.g. "
                          f"{escape(result.unlabelled[0])}")


app.command("stats", help=_unwrap(STATS_HELP), short_help=STATS_SUMMARY, epilog=STATS_EXAMPLES)(stats)
app.command("import", help=_unwrap(IMPORT_HELP), short_help=IMPORT_SUMMARY, epilog=IMPORT_EXAMPLES)(import_command)
