"""Thin and small objects on the street scenes: how much of each pole and sign a model finds, by width, how sure its
affinities are there, and a sweep of the settings that should matter.

Two subcommands:

* ``analyse --model DIR``: one trained model on the streets validation set (:mod:`regproxy_cli.data.streets`):
  mIoU, boundary F, per-object recall binned by object width (1, 2, 3, 4-5, 6-7, 8+ px; poles, signs, both) and
  the entropy of the pixel-to-token affinities (``affinity`` of :class:`regproxy_cli.model.regproxy.ProxyOutput`,
  9 neighbours, so at most ln 9) on pole and sign pixels, on other pixels at a class boundary and on the interior.
* ``sweep``: trains variants of one base config (``--config``, default ``configs/demo.yaml`` on the streets
  scenes) and analyses each. Every variant is a list of ``--set``-style overrides; ``--axis KEY=V1,V2,..``
  varies one key, one axis at a time around the base (``--grid`` crosses them all). Default axes: tap depth M
  (``model.m``), region resolution h = w (``model.region_res``), token stride 8 against 16 (``model.backbone``
  demo8 / demo16) and training length (``optim.iters``); the linear baseline is trained at the base and at each
  backbone and length of those axes, so every comparison with it is at equal budget.

``demo16`` is ViT-Demo/8's twin with 16 px patches (same width, depth, heads and M). Unless a plugin of that name is
installed, this script registers it for its own process only (models trained with it reload only here).

    python -m bench.thin_objects sweep [--seeds 1] [--iters 600] [--threads 1] [--out docs/thin_objects.json]
    python -m bench.thin_objects analyse --model runs/thin_objects/seed0/base/best
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from regproxy_cli.data.open import open_dataset
from regproxy_cli.data.streets import STREET_CLASSES, WIDTH_BINS, decode_runs, read_sidecar, width_bin
from regproxy_cli.engine.config import load_config
from regproxy_cli.errors import RegproxyError
from regproxy_cli.hub.checkpoint import load_pretrained
from regproxy_cli.inference.predictor import normalise
from regproxy_cli.model import plugins
from regproxy_cli.model.plugins import BackboneSpec

from .common import machine, score
from .quality import BASE_CONFIG, DATA_DIR, ROOT, cell, data_overrides, run_config, spread, train_fresh, write_json

DEFAULT_AXES = ["model.m=0,1,2,3,4", "model.region_res=1,2,4,8", "model.backbone=demo8,demo16",
                "optim.iters=300,600,1200,2400"]
BASELINE_AXES = ("model.backbone", "optim.iters")  # axes the linear baseline is trained along too
THIN_KINDS = ("pole", "sign")
LN9 = float(np.log(9))


def demo16() -> BackboneSpec:
    """ViT-Demo/8's spec (the installed ``demo8``) with 16 px patches: the token stride doubles, the rest stays."""
    demo8 = plugins.get_backbone("demo8")
    return replace(demo8, name="demo16", title="ViT-Demo/16", stride=16,
                   factory=partial(demo8.factory, stride=16, patch_size=16))


class _InProcessEntryPoint:
    """Stands in for an installed entry point: what the plugin registry calls ``load()`` on."""

    def __init__(self, spec: BackboneSpec) -> None:
        self.spec = spec

    def load(self) -> BackboneSpec:
        return self.spec


def register_demo16() -> None:
    """Make ``demo16`` known to this process unless an installed plugin already declares it.

    The registry's discovery result is cached for the process, so one added entry serves train() and
    load_pretrained() alike; nothing is installed and nothing outlives the process.
    """
    if "demo16" not in plugins.list_backbones():
        found = plugins.discover(plugins.ENTRY_POINT_GROUP, "backbone")  # the cached dict every lookup reads
        found["demo16"] = ("bench.thin_objects", _InProcessEntryPoint(demo16()))


# ---------------------------------------------------------------------------------------------------------------
# Analysis of one model
# ---------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def affinity_entropy(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """(H, W) entropy in nats of each pixel's affinities over its 9 neighbouring tokens, at the image's size.

    The affinities live on the painted grid (each token split into h x w sub-pixels, stride / h input pixels
    each); every input pixel takes the value of the sub-pixel it lies in.
    """
    x = normalise(image, model.config)
    affinity = model.forward_all(x).affinity[0].float()  # (9, h, w, Hg, Wg)
    entropy = -(affinity * affinity.clamp_min(1e-12).log()).sum(0)  # (h, w, Hg, Wg)
    sub_h, sub_w, grid_h, grid_w = entropy.shape
    painted = entropy.permute(2, 0, 3, 1).reshape(grid_h * sub_h, grid_w * sub_w)  # row = token row * h + i
    stride = model.backbone.stride
    full = F.interpolate(painted[None, None], size=(grid_h * stride, grid_w * stride), mode="nearest")[0, 0]
    return full[: image.shape[0], : image.shape[1]].numpy()


def class_edges(label: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another class (both sides of every edge)."""
    edge = np.zeros(label.shape, dtype=bool)
    vertical, horizontal = label[1:] != label[:-1], label[:, 1:] != label[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def entropy_report(model: torch.nn.Module, dataset, sidecars: Path) -> dict | None:
    """Mean affinity entropy on pole and sign pixels (also by object width), on other class-edge pixels and on the
    interior, in nats and as a fraction of ln 9; None for a model without affinities (the baseline)."""
    if not hasattr(model, "head"):
        return None
    sums = {"thin": [0.0, 0], "boundary": [0.0, 0], "interior": [0.0, 0]}
    by_width: dict[str, list] = {}
    for index in range(len(dataset)):
        image, label, name = dataset[index]
        entropy = affinity_entropy(model, image)
        sidecar = read_sidecar(sidecars / f"{name}.json")
        thin = np.zeros(entropy.shape, dtype=bool)
        for obj in sidecar["objects"]:
            if obj["kind"] in THIN_KINDS:
                mask = decode_runs(obj["runs"], entropy.shape)
                thin |= mask
                cell = by_width.setdefault(width_bin(obj["width_px"]), [0.0, 0])
                cell[0] += float(entropy[mask].sum())
                cell[1] += int(mask.sum())
        edge = class_edges(np.asarray(label)) & ~thin
        for key, mask in (("thin", thin), ("boundary", edge), ("interior", ~thin & ~edge)):
            sums[key][0] += float(entropy[mask].sum())
            sums[key][1] += int(mask.sum())

    def mean(cell: list) -> dict:
        value = cell[0] / cell[1] if cell[1] else float("nan")
        return {"nats": round(value, 4), "of_ln9": round(value / LN9, 4), "pixels": cell[1]}

    order = [width_bin(e) for e in WIDTH_BINS]
    return {**{key: mean(cell) for key, cell in sums.items()},
            "thin_by_width": {b: mean(by_width[b]) for b in order if b in by_width}}


def analyse(model: torch.nn.Module, dataset, sidecars: Path) -> dict:
    """Everything ``analyse`` reports for one model: :func:`bench.common.score` (mIoU, BF, per-object recall by width)
    and :func:`entropy_report`."""
    if tuple(model.config.classes) != STREET_CLASSES:
        raise RegproxyError(f"the model's classes {list(model.config.classes)} are not the street scenes' "
                            f"{list(STREET_CLASSES)}: train it on data.synthetic_generator=streets")
    result = score(model, dataset, sidecars=sidecars)
    result["affinity_entropy"] = entropy_report(model, dataset, sidecars)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------------------------


def parse_axis(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    if not sep or "." not in key or not values:
        raise RegproxyError(f"--axis {text!r}: expected section.key=value1,value2,...")
    return key.strip(), [v.strip() for v in values.split(",") if v.strip()]


def variants(axes: list[tuple[str, list[str]]], base_values: dict[str, str], grid: bool,
             baseline: bool) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every variant: the base, then one axis at a time (or the full grid), then the baseline
    (again at every value of a backbone or training-length axis, so each RegProxy row has its equal-budget twin).

    A value equal to the base's is the base itself and is not trained twice.
    """
    found: list[tuple[str, list[str]]] = [("base", [])]
    if grid:
        for combination in itertools.product(*[[(key, v) for v in values] for key, values in axes]):
            changed = [(k, v) for k, v in combination if base_values.get(k) != v]
            if changed:
                found.append((", ".join(f"{k}={v}" for k, v in changed), [f"{k}={v}" for k, v in changed]))
    else:
        for key, values in axes:
            found += [(f"{key}={v}", [f"{key}={v}"]) for v in values if base_values.get(key) != v]
    if baseline:  # the baseline has no head, so M and h = w mean nothing to it; backbone and length do
        found.append(("linear baseline", ["model.baseline=true"]))
        found += [(f"linear baseline, {key}={v}", ["model.baseline=true", f"{key}={v}"])
                  for key, values in axes if key in BASELINE_AXES for v in values if base_values.get(key) != v]
    return found


def iterations(overrides: list[str], default: int) -> int:
    """The run's length: the last ``optim.iters`` override, else ``default``."""
    values = [o.split("=", 1)[1] for o in overrides if o.startswith("optim.iters=")]
    return int(values[-1]) if values else default


def row_cells(entry: dict) -> list[str]:
    return [cell(entry["mIoU"]), cell(entry["BF"]), cell(entry["pole_IoU"]), cell(entry["sign_IoU"]),
            *[cell(entry["recall_by_width"][b]) for b in entry["recall_by_width"]],
            *[cell(entry["entropy"][k]) for k in ("thin", "boundary", "interior")], cell(entry["train_s"])]


def summarise(runs: list[dict]) -> list[dict]:
    """One entry per variant, each figure over its seeds (:func:`quality.spread`)."""
    bins = [width_bin(e) for e in WIDTH_BINS]
    bins = [b for b in bins if any(b in r["object_recall"]["pole+sign"] for r in runs)]  # poles and signs: < 8 px
    pole, sign = STREET_CLASSES.index("pole"), STREET_CLASSES.index("sign")
    entries = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]

        def recall(r: dict, b: str) -> float | None:
            cell = r["object_recall"]["pole+sign"].get(b)
            return None if cell is None else round(100 * cell["mean_recall"], 2)

        def entropy(r: dict, key: str) -> float | None:
            return None if r["affinity_entropy"] is None else round(100 * r["affinity_entropy"][key]["of_ln9"], 2)

        entries.append({
            "variant": name, "overrides": mine[0]["overrides"], "seeds": [r["seed"] for r in mine],
            "mIoU": spread([r["mIoU"] for r in mine]), "BF": spread([r["BF"] for r in mine]),
            "pole_IoU": spread([r["IoU"][pole] for r in mine]), "sign_IoU": spread([r["IoU"][sign] for r in mine]),
            "recall_by_width": {b: spread([recall(r, b) for r in mine]) for b in bins},
            "entropy": {k: spread([entropy(r, k) for r in mine]) for k in ("thin", "boundary", "interior")},
            "train_s": spread([r["train_s"] for r in mine]),
        })
    return entries


def markdown(entries: list[dict]) -> str:
    bins = list(entries[0]["recall_by_width"]) if entries else []
    head = (["variant", "mIoU", "BF", "pole IoU", "sign IoU"] + [f"recall {b} px" for b in bins]
            + ["H thin", "H edge", "H interior", "train s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {e['variant']} | " + " | ".join(row_cells(e)) + " |" for e in entries]
    return ("\nmean ± sd over seeds; recall: mean per-object recall of poles and signs (%) by width; H: affinity "
            "entropy as % of ln 9 on pole/sign pixels, other class-edge pixels and the rest\n\n" + "\n".join(lines) + "\n")


STUDY_KEYS = ("config", "set", "data", "iters", "train_images", "val_images", "image_size")  # what makes runs comparable


def earlier_study(out: Path, setup: dict) -> dict | None:
    """The sweep in ``out`` if it had the same base (config, overrides, data, length); None for any other."""
    if not out.is_file():
        return None
    earlier = json.loads(out.read_text())
    return earlier if all(earlier["setup"].get(key) == setup[key] for key in STUDY_KEYS) else None


def sweep(args: argparse.Namespace) -> int:
    register_demo16()
    data = data_overrides("streets", args.train_images, args.val_images, args.size, args.data_dir)
    base_config = run_config(args.runs / "_base", args.iters, [*data, *args.set], base=args.config)
    dataset = base_config.data.open(base_config.data.val_split)
    sidecars = Path(base_config.data.root) / "instances" / base_config.data.val_split
    axes = [parse_axis(a) for a in (args.axis or DEFAULT_AXES)]
    flat = base_config.to_dict()
    if flat["model"]["m"] is None:  # the backbone's own M: an axis value equal to it is the base
        flat["model"]["m"] = plugins.get_backbone(flat["model"]["backbone"]).m
    base_values = {key: str(flat[key.split(".")[0]].get(key.split(".")[1])) for key, _ in axes}
    todo = variants(axes, base_values, args.grid, not args.no_baseline)
    print(f"{len(todo)} variants x {args.seeds} seeds: {', '.join(name for name, _ in todo)}", file=sys.stderr)
    started = time.perf_counter()
    setup = {"config": str(args.config), "set": args.set, "data": data, "iters": args.iters,
             "axes": [f"{k}={','.join(v)}" for k, v in axes], "grid": args.grid, "base_values": base_values,
             "train_images": args.train_images, "val_images": args.val_images, "image_size": args.size,
             "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(), "machine": machine()}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    retrained = {(name, seed) for name, _ in todo for seed in seeds}
    earlier = None if args.fresh else earlier_study(args.out, setup)
    runs = [r for r in earlier["runs"] if (r["variant"], r["seed"]) not in retrained] if earlier else []
    if runs:  # a study grows seed by seed
        print(f"keeping {len(runs)} runs of the same study from {args.out}", file=sys.stderr)
        setup["axes"] = list(dict.fromkeys([*earlier["setup"]["axes"], *setup["axes"]]))
    for seed in seeds:
        for name, overrides in todo:
            iters = iterations(overrides, args.iters)
            run_dir = args.runs / f"seed{seed}" / name.replace(", ", "+").replace("=", "-").replace(" ", "_")
            config = run_config(run_dir, iters, [*data, *args.set, *overrides, f"run.seed={seed}",
                                                 *([f"run.threads={args.threads}"] if args.threads else [])],
                                base=args.config)
            model, train_s = train_fresh(config, not args.no_progress)
            result = analyse(model, dataset, sidecars)
            runs.append({"variant": name, "overrides": overrides, "seed": seed, "iters": iters,
                         "backbone": config.model.backbone, "m": model.config.m,
                         "region_res": None if config.model.baseline else config.model.region_res,
                         **result, "train_s": round(train_s, 1), "s_per_iter": round(train_s / iters, 4)})
            print(f"seed {seed} {name}: mIoU {result['mIoU']:.2f} ({train_s:.0f} s, {train_s / iters:.3f} s/iter)",
                  file=sys.stderr)
            write_json(args.out, {"setup": setup, "total_s": round(time.perf_counter() - started, 1),
                                  "summary": summarise(runs), "runs": runs})
    print(markdown(summarise(runs)))
    print(f"total wall time {(time.perf_counter() - started) / 60:.1f} min; results in {args.out}")
    return 0


def analyse_command(args: argparse.Namespace) -> int:
    register_demo16()
    model = load_pretrained(args.model).eval()
    if args.data_root is not None:
        root = args.data_root
        dataset = open_dataset("folder", root, "val")
    else:
        config = load_config(BASE_CONFIG, data_overrides("streets", args.train_images, args.val_images, args.size,
                                                         args.data_dir))
        root = Path(config.data.root)
        dataset = config.data.open(config.data.val_split)
    result = analyse(model, dataset, Path(root) / "instances" / "val")
    text = {"model": str(args.model), "data_root": str(root), **result}
    if args.out is not None:
        write_json(args.out, text)
    recall = result["object_recall"]["pole+sign"]
    print(f"mIoU {result['mIoU']:.2f}  BF {result['BF']:.2f}")
    print("pole+sign recall by width: " + ", ".join(
        f"{b} px {100 * c['mean_recall']:.1f}% ({c['objects']})" for b, c in recall.items()))
    entropy = result["affinity_entropy"]
    if entropy is not None:
        print("affinity entropy (% of ln 9): " + ", ".join(
            f"{k} {100 * entropy[k]['of_ln9']:.1f}" for k in ("thin", "boundary", "interior")))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------------------------


def _length_series(runs: list[dict], baseline: bool) -> dict[int, list[dict]]:
    """The runs of the base setting that differ only in length (RegProxy's or the baseline's): iterations -> runs
    (one per seed)."""
    base, prefix = ("linear baseline", "linear baseline, optim.iters=") if baseline else ("base", "optim.iters=")
    series: dict[int, list[dict]] = {}
    for run in runs:
        if run["variant"] == base or run["variant"].startswith(prefix):
            series.setdefault(run["iters"], []).append(run)
    return dict(sorted(series.items()))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """:func:`quality.spread`'s mean and sd, the sd 0 for a single seed (an error bar of nothing)."""
    stats = spread(values)
    return stats["mean"], stats["sd"] or 0.0


def plot(args: argparse.Namespace) -> int:
    """One PNG: pole recall by width over the quality study's seeds, and mIoU, pole IoU and affinity entropy
    against training length from a sweep with an ``optim.iters`` axis (mean ± sd over its seeds)."""
    from regproxy_cli.plots import new_figure, save_figure

    quality = json.loads(args.quality.read_text())
    sweep_runs = json.loads(args.sweep.read_text())["runs"]
    figure = new_figure(15, 4.2)
    recall_axes, length_axes, entropy_axes = figure.subplots(1, 3)

    entries = {e["model"]: e for e in quality["summary"]["streets"]}
    for name, colour in (("linear baseline", "tab:grey"), ("RegProxy h=w=4", "tab:red"), ("RegProxy h=w=1", "tab:blue")):
        if name not in entries:
            continue
        bins = entries[name]["object_recall"]["pole"]  # signs: none found by any model at this budget
        labels = list(bins)
        means = [bins[b]["mean_recall"]["mean"] for b in labels]
        sds = [bins[b]["mean_recall"]["sd"] or 0.0 for b in labels]
        recall_axes.errorbar(range(len(labels)), means, yerr=sds, marker="o", capsize=3, color=colour, label=name)
    counts = entries["linear baseline"]["object_recall"]["pole"]
    recall_axes.set_xticks(range(len(counts)), [f"{b}\n({counts[b]['objects']})" for b in counts])
    recall_axes.set(xlabel="pole width, px (poles)", ylabel="mean per-pole recall, %",
                    title=f"streets, 600 iterations: poles found ({len(quality['setup']['seeds'])} seeds)")
    recall_axes.legend(fontsize=8)

    pole = STREET_CLASSES.index("pole")
    seed_counts = set()
    length_series = {baseline: _length_series(sweep_runs, baseline) for baseline in (False, True)}
    for baseline, colour, label in ((False, "tab:red", "RegProxy h=w=4"), (True, "tab:grey", "linear baseline")):
        series = length_series[baseline]
        iters = list(series)
        seed_counts |= {len(group) for group in series.values()}
        for get, marker, style, what in ((lambda r: r["mIoU"], "o", "-", "mIoU"),
                                         (lambda r: r["IoU"][pole], "s", "--", "pole IoU")):
            stats = [_mean_sd([get(r) for r in group]) for group in series.values()]
            length_axes.errorbar(iters, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker=marker, ls=style,
                                 capsize=3, color=colour, label=f"{label}: {what}")
        if not baseline:
            for key, style in (("thin", "-"), ("boundary", "--"), ("interior", ":")):
                stats = [_mean_sd([100 * r["affinity_entropy"][key]["of_ln9"] for r in group])
                         for group in series.values()]
                entropy_axes.errorbar(iters, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", ls=style,
                                      capsize=3, color=colour,
                                      label={"thin": "pole and sign pixels", "boundary": "other class edges"}.get(key, key))
    lengths = list(length_series[False])  # RegProxy's lengths
    for axes in (length_axes, entropy_axes):
        axes.set_xscale("log", base=2)
        axes.set_xticks(lengths, [str(n) for n in lengths])
        axes.set_xlabel("training iterations (batch 8)")
    shown = "-".join(str(n) for n in sorted(seed_counts)) + (" seed" if seed_counts == {1} else " seeds")
    length_axes.set(ylabel="%", title=f"streets: training length ({shown}, mean ± sd)")
    length_axes.legend(fontsize=8)
    entropy_axes.set(ylabel="affinity entropy, % of ln 9", title="RegProxy's affinities (100% = uniform)")
    entropy_axes.legend(fontsize=8)
    print(f"wrote {save_figure(figure, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--train-images", type=int, default=400, help="generated training street scenes")
    common.add_argument("--val-images", type=int, default=50, help="generated validation street scenes")
    common.add_argument("--size", type=int, default=128, help="scene side in px (also the training crop)")
    common.add_argument("--runs", type=Path, default=ROOT / "runs" / "thin_objects", help="where runs are written")
    common.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where the generated scenes are written")

    one = commands.add_parser("analyse", parents=[common], help="analyse one trained model")
    one.add_argument("--model", type=Path, required=True, help="a model directory (a run's best/)")
    one.add_argument("--data-root", type=Path, default=None,
                     help="a dataset written by write_streets_dataset (default: the one the sizes above name)")
    one.add_argument("--out", type=Path, default=None, help="also write the result as JSON")

    many = commands.add_parser("sweep", parents=[common], help="train and analyse variants of one base config")
    many.add_argument("--config", type=Path, default=BASE_CONFIG, help="the base config (default configs/demo.yaml)")
    many.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="an override of the base config for every variant (repeatable)")
    many.add_argument("--axis", action="append", default=None, metavar="KEY=V1,V2",
                      help=f"a key to vary (repeatable; default: {' '.join(DEFAULT_AXES)})")
    many.add_argument("--grid", action="store_true", help="cross all axes instead of one axis at a time")
    many.add_argument("--no-baseline", action="store_true", help="leave out the linear-baseline row")
    many.add_argument("--iters", type=int, default=600, help="training iterations unless an axis sets optim.iters")
    many.add_argument("--seeds", type=int, default=1, help="training seeds per variant (run.seed)")
    many.add_argument("--first-seed", type=int, default=0, help="the first run.seed")
    many.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    many.add_argument("--no-progress", action="store_true", help="no progress bars")
    many.add_argument("--out", type=Path, default=ROOT / "docs" / "thin_objects.json", help="JSON result file")
    many.add_argument("--fresh", action="store_true",
                      help="drop the runs already in --out (by default a sweep with the same base keeps those it "
                           "does not retrain, so seeds and axes can be added run by run)")
    figure = commands.add_parser("plot", help="draw the quality study's recall by width and a length sweep")
    figure.add_argument("--quality", type=Path, default=ROOT / "docs" / "quality.json", help="bench/quality.py's JSON")
    figure.add_argument("--sweep", type=Path, default=ROOT / "docs" / "thin_objects.json", help="a sweep's JSON")
    figure.add_argument("--out", type=Path, default=ROOT / "docs" / "thin_objects.png", help="the PNG to write")
    args = parser.parse_args(argv)
    if args.command == "plot":
        return plot(args)
    if args.size < 32 or min(args.train_images, args.val_images) < 1:
        parser.error("--size must be at least 32, --train-images and --val-images positive")
    try:
        return sweep(args) if args.command == "sweep" else analyse_command(args)
    except RegproxyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
