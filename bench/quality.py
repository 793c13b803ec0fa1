"""Quality per cost on generated data: RegProxy against its linear baseline and the output-stride sweep, over seeds
and on two independently written scene generators.

Trains every variant with the public :func:`regproxy_cli.engine.train.train` from ``configs/demo.yaml`` (ViT-Demo/8
from scratch; same data, iterations and batch size within a seed, i.e. an equal training budget): the paper's
linear baseline and RegProxy with region resolution h = w = 1, 2, 4, 8 (output stride 8, 4, 2, 1; Table 8 of the
paper). Each (generator, seed, variant) is one training run; the seed (``run.seed``) sets the initial weights and
the data order, the scenes themselves are the same for every seed.

Generators (``--generators``):

* ``scenes``: :mod:`regproxy_cli.data.synthetic` (ellipses, blobs, 2-4 px lines, rings; 5 classes), the demo's;
* ``streets``: :mod:`regproxy_cli.data.streets` (sky, buildings, curved road, ground, vegetation, poles 1-6 px
  wide, signs 3-7 px; 7 classes), written separately to check that a result is not one generator's artefact.

Every run is scored on the validation split with mIoU (mmseg semantics), per-class IoU, the class-aware boundary
F-score (:class:`regproxy_cli.engine.metrics.BoundaryFScore`, 2 px tolerance; all through
:func:`bench.common.score`) and, on streets, the per-object
recall of poles and signs binned by width (:func:`regproxy_cli.data.streets.recall_by_width`). The summary gives
each figure as mean, sample standard deviation and the individual seeds' values, and each RegProxy variant's
paired difference from the baseline of the same seed.

    python -m bench.quality [--seeds 3] [--generators scenes,streets] [--iters 600] [--threads 1] [--out F]

Run outputs go to ``runs/quality/`` (git-ignored; replaced run by run), generated data to ``data/quality-*``
(``--data-dir``). The
JSON is rewritten after every run, so an interrupted study keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from regproxy_cli.engine.config import TrainConfig, load_config
from regproxy_cli.engine.train import train
from regproxy_cli.files import write_text_atomic
from regproxy_cli.hub.checkpoint import load_pretrained
from regproxy_cli.model.flops import count_flops

from .common import TOLERANCE_PX, machine, repo_relative, score

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "demo.yaml"
DATA_DIR = ROOT / "data"  # generated scenes, git-ignored
VARIANTS = [  # (name, baseline, region_res)
    ("linear baseline", True, 4),
    ("RegProxy h=w=1", False, 1),
    ("RegProxy h=w=2", False, 2),
    ("RegProxy h=w=4", False, 4),
    ("RegProxy h=w=8", False, 8),
]
BASELINE = "linear baseline"
GENERATORS = ("scenes", "streets")
THIN_CLASSES = {"scenes": ("line",), "streets": ("pole", "sign")}  # the sub-token structures of each generator


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------


def data_root(generator: str, train_images: int, val_images: int, size: int, parent: Path = DATA_DIR) -> Path:
    """Where a generator's scenes live: one folder per generator and size, so runs of any setting can share it."""
    return parent / f"quality-{generator}-{train_images}-{val_images}-{size}"


def data_overrides(generator: str, train_images: int, val_images: int, size: int,
                   parent: Path = DATA_DIR) -> list[str]:
    """``--set`` overrides that point configs/demo.yaml at a generator's scenes (generated under ``parent``)."""
    root = data_root(generator, train_images, val_images, size, parent)
    return [f"data.synthetic_generator={generator}", f"data.synthetic_train={train_images}",
            f"data.synthetic_val={val_images}", f"data.synthetic_size={size}", f"data.crop_size={size}",
            f"data.scale=[{2 * size}, {size}]", f"data.root={root}"]


def run_config(run_dir: Path, iters: int, overrides: list[str], base: Path = BASE_CONFIG) -> TrainConfig:
    """``base`` for a run of ``iters`` iterations into ``run_dir``, evaluated and saved once at the end;
    ``overrides`` (``section.key=value``) come last and win."""
    return load_config(base, [
        f"optim.iters={iters}", f"optim.warmup_iters={min(50, max(iters // 10, 1))}", f"run.out_dir={run_dir}",
        f"run.eval_every={iters}", f"run.save_every={iters}", *overrides,
    ])


def train_fresh(config: TrainConfig, progress: bool) -> tuple[torch.nn.Module, float]:
    """Train ``config`` into an emptied ``run.out_dir``; returns the best model (eval mode) and the wall seconds."""
    run_dir = Path(config.run.out_dir)
    if run_dir.exists():  # a fresh run every time: train() refuses to overwrite without --resume
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    best_dir = train(config, progress=progress)
    return load_pretrained(best_dir).eval(), time.perf_counter() - started


def run_variant(generator: str, seed: int, name: str, baseline: bool, region_res: int, args, dataset) -> dict:
    run_dir = args.runs / generator / f"seed{seed}" / name.replace(" ", "_").replace("=", "")
    config = run_config(run_dir, args.iters, [
        *data_overrides(generator, args.train_images, args.val_images, args.size, args.data_dir),
        f"model.baseline={str(baseline).lower()}", f"model.region_res={region_res}", f"run.seed={seed}",
        *([f"run.threads={args.threads}"] if args.threads else []),
    ])
    model, train_s = train_fresh(config, not args.no_progress)
    classes = list(model.config.classes)
    sidecars = Path(config.data.root) / "instances" / config.data.val_split if generator == "streets" else None
    scores = score(model, dataset, sidecars=sidecars)
    flops = count_flops(config.model.backbone, size=config.data.crop_size, classes=len(classes), region_res=region_res,
                        baseline=baseline)
    return {"generator": generator, "seed": seed, "model": name, "baseline": baseline,
            "region_res": None if baseline else region_res, "output_stride": 8 if baseline else 8 // region_res,
            **scores, "true_GMACs": round(flops.true_macs / 1e9, 4), "params": flops.params,
            "train_s": round(train_s, 1), "s_per_iter": round(train_s / args.iters, 4)}


# ---------------------------------------------------------------------------------------------------------------
# Summary over seeds
# ---------------------------------------------------------------------------------------------------------------


def spread(values: list[float | None]) -> dict:
    """Mean, sample standard deviation (None below two values) and the values themselves; None values dropped."""
    kept = [v for v in values if v is not None]
    return {"mean": round(statistics.fmean(kept), 2) if kept else None,
            "sd": round(statistics.stdev(kept), 2) if len(kept) > 1 else None, "n": len(kept), "values": values}


def summarise(runs: list[dict], classes: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Per generator, one entry per variant: every figure over the seeds, and paired differences from the baseline."""
    summary: dict[str, list[dict]] = {}
    for generator in dict.fromkeys(r["generator"] for r in runs):
        names = classes[generator]
        thin = [names.index(c) for c in THIN_CLASSES[generator]]
        baselines = {r["seed"]: r for r in runs if r["generator"] == generator and r["model"] == BASELINE}
        entries = []
        for name, _, _ in VARIANTS:
            mine = [r for r in runs if r["generator"] == generator and r["model"] == name]
            if not mine:
                continue
            first = mine[0]
            entry = {"model": name, "output_stride": first["output_stride"], "seeds": [r["seed"] for r in mine],
                     "true_GMACs": first["true_GMACs"], "params": first["params"]}
            for key in ("mIoU", "BF", "mBF", "aAcc", "train_s"):
                entry[key] = spread([r[key] for r in mine])
            entry["thin_IoU"] = {names[c]: spread([r["IoU"][c] for r in mine]) for c in thin}
            entry["IoU_per_class"] = {names[c]: spread([r["IoU"][c] for r in mine]) for c in range(len(names))}
            entry["BF_per_class"] = {names[c]: spread([r["BF_per_class"][c] for r in mine]) for c in range(len(names))}
            paired = [(r, baselines[r["seed"]]) for r in mine if r["seed"] in baselines]
            if name != BASELINE and paired:

                def delta(get, paired=paired) -> dict:
                    both = [(get(r), get(b)) for r, b in paired]
                    return spread([None if a is None or b is None else round(a - b, 2) for a, b in both])

                entry["delta_vs_baseline"] = {
                    "seeds": [r["seed"] for r, _ in paired], "mIoU": delta(lambda r: r["mIoU"]),
                    "BF": delta(lambda r: r["BF"]),
                    **{f"{names[c]}_IoU": delta(lambda r, c=c: r["IoU"][c]) for c in thin},
                }
            if "object_recall" in first:
                entry["object_recall"] = {}
                for kind, bins in first["object_recall"].items():
                    entry["object_recall"][kind] = {
                        label: {"objects": bins[label]["objects"],
                                "mean_recall": spread([_pct(r["object_recall"][kind].get(label)) for r in mine])}
                        for label in bins}
            entries.append(entry)
        summary[generator] = entries
    return summary


def _pct(cell: dict | None) -> float | None:
    return None if cell is None else round(100 * cell["mean_recall"], 2)


def cell(s: dict) -> str:
    """A :func:`spread` as a table cell: the mean ± sd to one decimal ("-" without values)."""
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.1f}" + (f" ± {s['sd']:.1f}" if s["sd"] is not None else "")


def markdown(summary: dict[str, list[dict]]) -> str:
    """One table per generator (mean ± sd over seeds), and for streets one of pole and sign recall by width."""
    out = []
    for generator, entries in summary.items():
        thin = list(THIN_CLASSES[generator])
        seeds = len(entries[0]["seeds"]) if entries else 0
        out.append(f"\n**{generator}** ({seeds} seeds; mean ± sd; Δ = paired difference from the baseline)\n")
        out.append("| model | output stride | mIoU | Δ mIoU | boundary F | "
                   + " | ".join(f"{c} IoU" for c in thin) + " | GMACs | train time |")
        out.append("|" + "---|" * (7 + len(thin)))
        for e in entries:
            d = e.get("delta_vs_baseline")
            out.append(f"| {e['model']} | {e['output_stride']} | {cell(e['mIoU'])} | "
                       f"{cell(d['mIoU']) if d else '-'} | {cell(e['BF'])} | "
                       + " | ".join(cell(e["thin_IoU"][c]) for c in thin)
                       + f" | {e['true_GMACs']:.3f} | {cell(e['train_s'])} s |")
        if entries and "object_recall" in entries[0]:
            bins = list(entries[0]["object_recall"]["pole+sign"])
            counts = ", ".join(f"{b}: {entries[0]['object_recall']['pole+sign'][b]['objects']}" for b in bins)
            out.append(f"\nrecall of poles and signs by width in px (mean per-object %, objects per bin {counts})\n")
            out.append("| model | " + " | ".join(bins) + " |")
            out.append("|" + "---|" * (1 + len(bins)))
            for e in entries:
                cells = e["object_recall"]["pole+sign"]
                out.append(f"| {e['model']} | " + " | ".join(cell(cells[b]["mean_recall"]) for b in bins) + " |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.json", help="JSON result file")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per variant (run.seed 0..N-1)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first run.seed")
    parser.add_argument("--generators", default="scenes,streets", help="comma-separated: scenes, streets")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of the model names, e.g. 'linear baseline,RegProxy h=w=4'")
    parser.add_argument("--iters", type=int, default=600, help="training iterations per run (batch 8)")
    parser.add_argument("--train-images", type=int, default=400, help="generated training scenes per generator")
    parser.add_argument("--val-images", type=int, default=50, help="generated validation scenes per generator")
    parser.add_argument("--size", type=int, default=128, help="scene side in px (also the training crop)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 5 iterations, 1 seed, 16 training and 4 validation scenes of 64 px")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality", help="where the runs are written")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where the generated scenes are written")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is much faster on a machine shared with other jobs")
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.seeds, args.train_images, args.val_images, args.size = 5, 1, 16, 4, 64
    args.generators = [g.strip() for g in args.generators.split(",") if g.strip()]
    unknown = [g for g in args.generators if g not in GENERATORS]
    if unknown or not args.generators:
        parser.error(f"--generators: {', '.join(unknown) or 'none given'}; choose from {', '.join(GENERATORS)}")
    names = [v[0] for v in VARIANTS]
    args.variants = names if args.variants is None else [v.strip() for v in args.variants.split(",")]
    if [v for v in args.variants if v not in names]:
        parser.error(f"--variants: choose from {', '.join(names)}")
    if args.seeds < 1 or args.iters < 1 or min(args.train_images, args.val_images) < 1 or args.size < 32:
        parser.error("--seeds, --iters, --train-images and --val-images must be positive, --size at least 32")
    return args


def write_json(path: Path, result: dict) -> None:
    """``result`` as indented JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    base = load_config(BASE_CONFIG)
    datasets, classes, setups = {}, {}, {}
    for generator in args.generators:
        config = load_config(BASE_CONFIG, data_overrides(generator, args.train_images, args.val_images, args.size,
                                                         args.data_dir))
        datasets[generator] = config.data.open(config.data.val_split)  # generates the scenes once
        classes[generator] = list(datasets[generator].classes)
        setups[generator] = {"classes": classes[generator], "thin_classes": list(THIN_CLASSES[generator]),
                             "data_root": repo_relative(Path(config.data.root))}
    setup = {"config": "configs/demo.yaml", "backbone": base.model.backbone, "pretrained": False,
             "iters": args.iters, "batch_size": base.optim.batch_size, "seeds": seeds,
             "seed_sets": "run.seed: initial weights and data order; the scenes are the same for every seed",
             "train_images": args.train_images, "val_images": args.val_images, "image_size": args.size,
             "boundary_tolerance_px": TOLERANCE_PX, "gmacs_input": f"{args.size}x{args.size}",
             "generators": setups, "variants": args.variants, "torch": torch.__version__,
             "threads": args.threads or torch.get_num_threads(), "machine": machine(),
             "quick": args.quick}
    started = time.perf_counter()
    runs: list[dict] = []
    # Seeds outermost: an interrupted study still has every variant of the seeds it finished.
    for seed in seeds:
        for generator in args.generators:
            for name, baseline, region_res in VARIANTS:
                if name not in args.variants:
                    continue
                runs.append(run_variant(generator, seed, name, baseline, region_res, args, datasets[generator]))
                r = runs[-1]
                print(f"{generator} seed {seed} {name}: mIoU {r['mIoU']:.2f}  BF {r['BF']:.2f}  "
                      f"({r['train_s']:.0f} s, {r['s_per_iter']:.3f} s/iter)", file=sys.stderr)
                result = {"setup": setup, "total_s": round(time.perf_counter() - started, 1),
                          "summary": summarise(runs, classes), "runs": runs}
                write_json(args.out, result)
    total_s = time.perf_counter() - started
    print(markdown(summarise(runs, classes)))
    print(f"total wall time {total_s / 60:.1f} min; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
