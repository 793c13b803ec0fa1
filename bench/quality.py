"""Quality per cost on the synthetic demo data: RegProxy against its linear baseline, and the output-stride sweep.

Trains five models with the public :func:`regproxy_cli.engine.train.train` from ``configs/demo.yaml`` (ViT-Demo/8 from
scratch, same seed, data, iterations and batch size, i.e. an equal training budget): the paper's linear
baseline and RegProxy with region resolution h = w = 1, 2, 4, 8 (output stride 8, 4, 2, 1; Table 8 of the paper).
Each is scored on the validation split with mIoU (mmseg semantics), the class-aware boundary F-score
(:class:`regproxy_cli.engine.metrics.BoundaryFScore`, 2 px tolerance) and the IoU of the thin-line class, next to its
true GMACs per 128^2 image, parameters and training wall time.

    python bench/quality.py [--out docs/quality.json] [--iters N] [--threads N] [--quick]

``docs/quality.json`` was made with ``--iters 600 --threads 1`` (about 12 minutes on 2 shared CPU cores; with
torch's default threads, other jobs on the same cores made each iteration some 20x slower).

Run outputs (checkpoints, logs) go to ``runs/quality/`` (git-ignored) and are replaced on every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from regproxy_cli.engine.config import load_config
from regproxy_cli.engine.metrics import BoundaryFScore, ConfusionMatrix
from regproxy_cli.engine.train import train
from regproxy_cli.inference.predictor import predict_labels
from regproxy_cli.io.checkpoint import load_pretrained
from regproxy_cli.model.flops import count_flops

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [  # (name, baseline, region_res)
    ("linear baseline", True, 4),
    ("RegProxy h=w=1", False, 1),
    ("RegProxy h=w=2", False, 2),
    ("RegProxy h=w=4", False, 4),
    ("RegProxy h=w=8", False, 8),
]
TOLERANCE_PX = 2


def score(model: torch.nn.Module, dataset, num_classes: int) -> dict:
    """mIoU, per-class IoU and boundary F over the dataset (percent), one prediction per image."""
    matrix = ConfusionMatrix(num_classes)
    boundary = BoundaryFScore(num_classes, tolerance_px=TOLERANCE_PX)
    for index in range(len(dataset)):
        image, label, _ = dataset[index]
        prediction = torch.from_numpy(predict_labels(model, image))
        target = torch.from_numpy(np.asarray(label, dtype=np.int64))
        matrix.update(prediction, target)
        boundary.update(prediction, target)
    iou, bf = matrix.compute(), boundary.compute()

    def percent(values) -> list[float | None]:
        return [None if np.isnan(v) else round(100 * float(v), 2) for v in values]

    return {"mIoU": round(100 * iou["mIoU"], 2), "aAcc": round(100 * iou["aAcc"], 2), "IoU": percent(iou["IoU"]),
            "BF": round(100 * bf["BF"], 2), "mBF": round(100 * bf["mBF"], 2),
            "boundary_precision": round(100 * bf["precision"], 2), "boundary_recall": round(100 * bf["recall"], 2),
            "BF_per_class": percent(bf["F"])}


def demo_config(run_dir: Path, iters: int, overrides: list[str]):
    """configs/demo.yaml for a run of ``iters`` iterations into ``run_dir``, evaluated and saved once at the end."""
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"optim.iters={iters}", f"optim.warmup_iters={min(50, max(iters // 10, 1))}", f"run.out_dir={run_dir}",
        f"run.eval_every={iters}", f"run.save_every={iters}", f"data.root={ROOT / 'data' / 'synthetic'}", *overrides,
    ])


def run_variant(name: str, baseline: bool, region_res: int, iters: int, out_dir: Path, dataset, progress: bool,
                threads: int | None = None) -> dict:
    run_dir = out_dir / name.replace(" ", "_").replace("=", "")
    if run_dir.exists():  # a fresh run every time: train() refuses to overwrite without --resume
        shutil.rmtree(run_dir)
    config = demo_config(run_dir, iters, [f"model.baseline={str(baseline).lower()}", f"model.region_res={region_res}",
                                          *([f"run.threads={threads}"] if threads else [])])
    started = time.perf_counter()
    best_dir = train(config, progress=progress)
    train_s = time.perf_counter() - started
    model = load_pretrained(best_dir).eval()
    classes = list(model.config.classes)
    scores = score(model, dataset, len(classes))
    flops = count_flops(config.model.backbone, size=config.data.crop, classes=len(classes), region_res=region_res,
                        baseline=baseline)
    stride = 8 if baseline else 8 // region_res
    line = classes.index("line")
    return {"model": name, "baseline": baseline, "region_res": None if baseline else region_res,
            "output_stride": stride, **scores, "line_IoU": scores["IoU"][line], "line_BF": scores["BF_per_class"][line],
            "train_mIoU": model.config.metrics.get("mIoU") if model.config.metrics else None,
            "true_GMACs": round(flops.true_macs / 1e9, 4), "params": flops.params, "train_s": round(train_s, 1)}


def markdown(rows: list[dict]) -> str:
    head = ("| model | output stride | mIoU | boundary F | thin-line IoU | thin-line BF | GMACs | params | "
            "train time |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['model']} | {r['output_stride']} | {r['mIoU']:.1f} | {r['BF']:.1f} | {r['line_IoU']:.1f} | "
        f"{r['line_BF']:.1f} | {r['true_GMACs']:.3f} | {r['params'] / 1e6:.3f} M | {r['train_s']:.0f} s |\n"
        for r in rows)


def show(rows: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: the markdown table below says the same
        return
    table = Table(title="quality per cost, synthetic scenes (val)")
    for column in ("model", "out stride", "mIoU", "BF", "line IoU", "line BF", "GMACs", "M params", "train"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        table.add_row(r["model"], str(r["output_stride"]), f"{r['mIoU']:.1f}", f"{r['BF']:.1f}",
                      f"{r['line_IoU']:.1f}", f"{r['line_BF']:.1f}", f"{r['true_GMACs']:.3f}",
                      f"{r['params'] / 1e6:.3f}", f"{r['train_s']:.0f} s")
    console = Console()
    Console(width=max(console.width, 110)).print(table)  # a piped run would wrap the table at 80 columns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.json", help="JSON result file")
    parser.add_argument("--iters", type=int, default=600, help="training iterations per model (batch 8)")
    parser.add_argument("--quick", action="store_true", help="a few iterations per model: a smoke test of the script")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality", help="where the runs are written")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is much faster on a machine shared with other jobs")
    args = parser.parse_args(argv)
    iters = 5 if args.quick else args.iters

    base = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={ROOT / 'data' / 'synthetic'}"])
    dataset = base.data.open(base.data.val_split)
    started = time.perf_counter()
    rows = []
    for name, baseline, region_res in VARIANTS:
        rows.append(run_variant(name, baseline, region_res, iters, args.runs, dataset, not args.no_progress,
                                args.threads))
        print(f"{name}: mIoU {rows[-1]['mIoU']:.2f}  BF {rows[-1]['BF']:.2f}  ({rows[-1]['train_s']:.0f} s)",
              file=sys.stderr)
    total_s = time.perf_counter() - started
    result = {
        "setup": {"config": "configs/demo.yaml", "backbone": base.model.backbone, "pretrained": False,
                  "iters": iters, "batch_size": base.optim.batch_size, "seed": base.run.seed,
                  "train_images": base.data.synthetic_train, "val_images": len(dataset),
                  "image_size": base.data.synthetic_size, "classes": list(dataset.classes),
                  "boundary_tolerance_px": TOLERANCE_PX, "gmacs_input": f"{base.data.crop}x{base.data.crop}",
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                  "quick": args.quick},
        "total_s": round(total_s, 1),
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    show(rows)
    print(markdown(rows))
    print(f"total wall time {total_s / 60:.1f} min; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
