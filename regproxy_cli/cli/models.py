"""``regproxy models``: the model zoo (the authors' released models) and where each comes from."""

from __future__ import annotations

from rich import box
from rich.table import Table

from regproxy_cli.cli.options import JsonOption
from regproxy_cli.cli.output import console, print_json
from regproxy_cli.constants import cache_dir

SUMMARY = "List the model zoo: the authors' released models and the paper's mIoU."
HELP = "List the model zoo: the authors' released RegProxy models, their settings and the paper's mIoU."


def models(
    as_json: JsonOption = False,
) -> None:
    from regproxy_cli.hub.zoo import ZOO
    from regproxy_cli.model.config import CONFIG_NAME
    from regproxy_cli.model.plugins import get_backbone

    rows = []
    for entry in ZOO.values():
        config = entry.config()
        rows.append({
            "name": entry.name, "backbone": entry.backbone, "title": get_backbone(entry.backbone).title,
            "dataset": entry.dataset, "classes": config.num_classes, "m": entry.m, "crop": entry.crop,
            "window_stride": config.stride, "test_scale": config.test_scale, "miou": entry.miou,
            "miou_ms": entry.miou_ms, "hub_repo": entry.hub_repo, "hub_revision": entry.hub_revision,
            "authors_url": entry.authors_url, "sha256": entry.sha256,
            "cached": (cache_dir() / "converted" / entry.name / CONFIG_NAME).is_file(),
        })
    if as_json:
        print_json(rows)
        return
    table = Table(title="RegProxy model zoo (ADE20K: -ade, Cityscapes: -city; the paper's mIoU)",
                  box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
    for column in ("name", "backbone", "K", "M", "crop", "stride", "mIoU", "ms+flip", "cached"):
        table.add_column(column, justify="left" if column in ("name", "backbone") else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["name"], r["title"], str(r["classes"]), str(r["m"]), str(r["crop"]), str(r["window_stride"]),
                      f"{r['miou']:.1f}", f"{r['miou_ms']:.1f}", "yes" if r["cached"] else "")
    console.print(table)
    revisions = sorted({entry.hub_revision for entry in ZOO.values()})
    console.print(f"Weights: the Hub repo regproxy/<name> at revision {', '.join(revisions)} if published, else the "
                  f"authors' release (sha256-checked), converted once into {cache_dir() / 'converted'}.")
