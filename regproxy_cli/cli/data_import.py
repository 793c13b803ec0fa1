"""``regproxy data import``: an annotation tool's export (labelme, COCO, CVAT, Pascal VOC) into the folder format."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from regproxy_cli.cli.options import JsonOption
from regproxy_cli.cli.output import console, err_console, print_json

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
    from regproxy_cli.data.formats import import_annotations

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
