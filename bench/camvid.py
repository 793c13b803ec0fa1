"""CamVid at equal budget: RegProxy against its linear baseline, and a fine-tune against training from scratch.

Every variant trains from ``configs/camvid-cpu.yaml`` (ViT-Demo/8, crop 256, batch 8, lr 1e-3) for the same
iterations with each seed, then is scored on CamVid val and test: mIoU (mmseg semantics), per-class IoU and the
class-aware boundary F-score (2 px tolerance). Variants:

- ``regproxy``: RegProxy h = w = 4 from scratch;
- ``baseline``: the paper's linear baseline (a linear classifier on the final tokens, bilinear upsampling);
- ``finetune``: RegProxy initialised from ``--init-from`` (by default the offline demo's model, trained on the
  generated scenes): its backbone and head load, its 5-class classifier does not match CamVid's names;
- ``hssn`` and ``hssn-flat``: RegProxy with the HSSN classifier under ``configs/hierarchies/camvid.yaml``, trained
  with the tree-min loss or with CE at each level only (``tree_min_weight: 0``); also scored per category;
- ``protoseg``: RegProxy with ProtoSeg's classifier (10 prototypes per class, the authors' M) and loss.

The default variants are the first three (issue 16's study); the plugin study is
``--variants regproxy,hssn,hssn-flat,protoseg``.

    python -m bench.camvid [--seeds 3] [--iters 1000] [--variants regproxy,baseline,finetune]

Runs go to ``runs/camvid/VARIANT-sSEED`` (git-ignored). A finished run is scored again, not retrained; an
interrupted one resumes; delete the folder to retrain. A seed whose run folder is gone (a fresh machine) but which
``--out`` already holds from an earlier study with the same config and iterations is kept from there, with the
machine it ran on, so a study grows seed by seed across machines; ``--retrain`` ignores those rows. CamVid itself (SegNet tutorial layout) is read from
``data/CamVid``; see docs/your-data.md (CamVid) for where to get it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from regproxy_cli.engine.config import load_config
from regproxy_cli.engine.train import read_checkpoint, train
from regproxy_cli.hub.checkpoint import load_pretrained

from .common import REPO, machine, repo_relative, score

VARIANTS = ("regproxy", "baseline", "finetune", "hssn", "hssn-flat", "protoseg")
DEFAULT_VARIANTS = VARIANTS[:3]
HIERARCHY = REPO / "configs" / "hierarchies" / "camvid.yaml"
PLUGIN_OVERRIDES = {
    "hssn": ["model.classifier=hssn", f"model.classifier_options={{hierarchy: {HIERARCHY}}}", "loss.kind=hssn"],
    "hssn-flat": ["model.classifier=hssn", f"model.classifier_options={{hierarchy: {HIERARCHY}}}", "loss.kind=hssn",
                  "loss.options={tree_min_weight: 0}"],
    "protoseg": ["model.classifier=protoseg", "model.classifier_options={prototypes: 10}", "loss.kind=protoseg"],
}
SPLITS = ("val", "test")


def overrides(variant: str, seed: int, iters: int, run_dir: Path, init_from: str, threads: int | None = None) -> list[str]:
    common = [f"run.seed={seed}", f"run.out_dir={run_dir}", f"optim.iters={iters}", f"run.eval_every={iters}",
              *([f"run.threads={threads}"] if threads else [])]
    if variant == "baseline":
        return [*common, "model.baseline=true"]
    if variant == "finetune":
        return [*common, f"model.init_from={init_from}"]
    return [*common, *PLUGIN_OVERRIDES.get(variant, [])]


def finished(run_dir: Path, iters: int) -> bool:
    last = run_dir / "last.pt"
    return (run_dir / "final").is_dir() and last.is_file() and read_checkpoint(last)["iteration"] >= iters


def train_variant(config_path: Path, variant: str, seed: int, iters: int, runs: Path, init_from: str,
                  threads: int | None = None) -> Path:
    run_dir = runs / f"{variant}-s{seed}"
    if not finished(run_dir, iters):
        config = load_config(config_path, overrides(variant, seed, iters, run_dir, init_from, threads))
        started = time.perf_counter()
        train(config, resume=(run_dir / "last.pt").is_file(), allow_config_change=True)
        (run_dir / "train_seconds.txt").write_text(f"{time.perf_counter() - started:.0f}\n")
    return run_dir


def earlier_rows(out: Path, config_path: Path, iters: int) -> dict[tuple[str, int], dict]:
    """Rows of an earlier study in ``out`` run with the same config file and iterations, by (variant, seed)."""
    if not out.is_file():
        return {}
    earlier = json.loads(out.read_text())
    if earlier["setup"]["config"] != repo_relative(config_path) or earlier["setup"]["iters"] != iters:
        return {}
    rows = {}
    for row in earlier["runs"]:
        row.setdefault("machine", earlier["setup"]["machine"])  # studies before per-row machines
        rows[(row["variant"], row["seed"])] = row
    return rows


def mean_spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2),
            "sd": round(statistics.stdev(values), 2) if len(values) > 1 else None,
            "values": [round(v, 2) for v in values]}


def summarise(rows: list[dict], classes: list[str]) -> dict:
    """Mean ± sd over seeds, per variant and split, of mIoU, boundary F and each class's IoU."""
    summary: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        summary[variant] = {}
        for split in SPLITS:
            scored = [r[split] for r in rows if r["variant"] == variant]  # one per seed that ran
            per_class = {}
            for index, name in enumerate(classes):
                values = [s["IoU"][index] for s in scored if s["IoU"][index] is not None]
                per_class[name] = round(statistics.fmean(values), 2) if values else None
            summary[variant][split] = {"mIoU": mean_spread([s["mIoU"] for s in scored]),
                                       "BF": mean_spread([s["BF"] for s in scored]), "IoU": per_class}
            if all("category_mIoU" in s for s in scored):  # hierarchical models: the coarser level too
                summary[variant][split]["category_mIoU"] = mean_spread([s["category_mIoU"] for s in scored])
    return summary


def markdown(summary: dict, classes: list[str], split: str) -> str:
    def cell(stat: dict) -> str:
        return f"{stat['mean']:.2f} ± {stat['sd']:.2f}" if stat["sd"] is not None else f"{stat['mean']:.2f}"

    levels = any("category_mIoU" in by_split[split] for by_split in summary.values())  # a hierarchical variant ran
    head = "| variant | seeds | mIoU | " + ("category mIoU | " if levels else "") + "boundary F | "
    head += " | ".join(classes) + " |\n" + "|---" * (4 + levels + len(classes)) + "|\n"
    lines = []
    for variant, by_split in summary.items():
        s = by_split[split]
        ious = " | ".join("–" if s["IoU"][c] is None else f"{s['IoU'][c]:.1f}" for c in classes)
        category = (f"{cell(s['category_mIoU'])} | " if "category_mIoU" in s else "– | ") if levels else ""
        lines.append(f"| {variant} | {len(s['mIoU']['values'])} | {cell(s['mIoU'])} | {category}{cell(s['BF'])} | "
                     f"{ious} |\n")
    return head + "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "camvid-cpu.yaml")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    parser.add_argument("--iters", type=int, default=1000, help="training iterations per run (batch 8)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--init-from", default="runs/demo/best", help="the finetune variant's starting model")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "camvid")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "camvid.json")
    parser.add_argument("--retrain", action="store_true",
                        help="do not keep rows of an earlier study in --out; train every seed here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 when another study shares the machine")
    parser.add_argument("--finished-only", action="store_true",
                        help="score the runs that have finished, train nothing (a study cut short by its budget)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant {unknown[0]}; known: {', '.join(VARIANTS)}")
    if "finetune" in variants and not Path(args.init_from).exists():
        parser.error(f"--init-from {args.init_from} does not exist: run `regproxy train configs/demo.yaml` first")

    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(args.config)
    datasets = {split: base.data.open(split) for split in SPLITS}
    classes = list(datasets["val"].classes)
    previous = {} if args.retrain else earlier_rows(args.out, args.config, args.iters)
    rows = []
    # seed-major: an interrupted study has every variant of the first seeds, not all seeds of the first variants
    for seed, variant in ((s, v) for s in range(args.seeds) for v in variants):
        run_dir = args.runs / f"{variant}-s{seed}"
        if not finished(run_dir, args.iters) and (variant, seed) in previous:
            rows.append(previous[(variant, seed)])
            print(f"{variant} seed {seed}: kept from {args.out.name} ({rows[-1]['machine']['cpu']})", file=sys.stderr)
            continue
        if args.finished_only:
            if not finished(run_dir, args.iters):
                continue
        else:
            run_dir = train_variant(args.config, variant, seed, args.iters, args.runs, args.init_from, args.threads)
        row = {"variant": variant, "seed": seed, "run": str(run_dir), "machine": machine()}
        cached = run_dir / "scores.json"  # scoring a run takes minutes: done once per finished run
        if cached.is_file() and cached.stat().st_mtime >= (run_dir / "last.pt").stat().st_mtime:
            row.update({split: score for split, score in json.loads(cached.read_text()).items() if split in SPLITS})
        else:
            model = load_pretrained(run_dir / "final").eval()
            for split, dataset in datasets.items():
                row[split] = score(model, dataset, levels=True)  # HSSN's category mIoU too
            cached.write_text(json.dumps({split: row[split] for split in SPLITS}) + "\n")
        seconds = run_dir / "train_seconds.txt"
        row["train_s"] = float(seconds.read_text()) if seconds.is_file() else None
        rows.append(row)
        print(f"{variant} seed {seed}: val mIoU {row['val']['mIoU']:.2f}, test mIoU {row['test']['mIoU']:.2f}",
              file=sys.stderr)
    # an earlier study's rows this run did not touch (other variants, other seeds) stay in the study
    done = {(row["variant"], row["seed"]) for row in rows}
    rows += [row for key, row in sorted(previous.items()) if key not in done]
    summary = summarise(rows, classes)
    result = {"setup": {"config": repo_relative(args.config), "iters": args.iters, "seeds": len({r["seed"] for r in rows}),
                        "batch_size": base.optim.batch_size, "crop": base.data.crop_size, "init_from": args.init_from,
                        "classes": classes, "images": {s: len(d) for s, d in datasets.items()},
                        "boundary_tolerance_px": 2, "machine": machine()},
              "summary": summary, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for split in SPLITS:
        print(f"\nCamVid {split} ({len(datasets[split])} images), mean ± sd over seeds:\n")
        print(markdown(summary, classes, split))
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
