"""``regproxy plugins``: every installed plugin (backbones, token classifiers, losses) and the package it comes from."""

from __future__ import annotations

from rich.table import Table

from regproxy_cli.cli.options import JsonOption
from regproxy_cli.cli.output import console, print_json

SUMMARY = "List the installed plugins: backbones, token classifiers and losses."
HELP = ("List the installed plugins: backbones (entry-point group regproxy.backbones), token classifiers "
        "(regproxy.classifiers, YAML model.classifier) and training losses (regproxy.losses, YAML loss.kind), with "
        "the distribution that registers each.")


def plugins(
    as_json: JsonOption = False,
) -> None:
    from regproxy_cli.engine.losses import LOSS_GROUP, get_loss
    from regproxy_cli.model.classifiers import CLASSIFIER_GROUP, get_classifier
    from regproxy_cli.model.plugins import ENTRY_POINT_GROUP, discover, get_backbone

    rows = []
    for kind, group, get in (("backbone", ENTRY_POINT_GROUP, get_backbone),
                             ("classifier", CLASSIFIER_GROUP, get_classifier), ("loss", LOSS_GROUP, get_loss)):
        for name, (dist, _) in sorted(discover(group, kind).items()):
            spec = get(name)
            rows.append({"kind": kind, "name": name, "title": spec.title, "distribution": dist,
                         "needs_classifier": getattr(spec, "classifier", None)})
    if as_json:
        print_json(rows)
        return
    table = Table(title="Installed plugins")
    for column in ("kind", "name", "what", "from"):
        table.add_column(column)
    for row in rows:
        what = row["title"] + (f" (needs classifier {row['needs_classifier']})" if row["needs_classifier"] else "")
        table.add_row(row["kind"], row["name"], what, row["distribution"])
    console.print(table)
