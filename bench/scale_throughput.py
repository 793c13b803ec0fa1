"""`regproxy predict` at scale on one machine: plain predict, `torchrun` with 2 processes, and `--engine ray` with 1
and 2 CPU workers, on the same folder of generated street scenes of mixed sizes.

    flock /tmp/regproxy-bench.lock python -m bench.scale_throughput               # 200 images, 3 rounds
    flock /tmp/regproxy-bench.lock python -m bench.scale_throughput --images 40 --rounds 1 --no-write

Every contender is the command a user runs, timed from start to exit (Python start-up, loading the model, and for
Ray connecting to the cluster and starting its actors, are part of it): the Ray runs connect with ``--address`` to
one local cluster started here (``ray.init(num_cpus=2)``, like ``ray start --head`` before a job), so the cluster's
own start-up is not counted. One untimed run of each contender comes first; then they run in a rotating order, round after round (bench.common's protocol),
and each run writes into a fresh folder; every engine's label PNGs and overlays are compared byte for byte with
plain predict's. The model is ViT-Demo/8 RegProxy (5 classes) with random weights, saved as a model directory (a
forward's speed does not depend on the values); every image is segmented at its own size. The section "Predict at
scale" of docs/benchmarks.md comes from docs/scale_throughput.json, which this writes (unless ``--no-write``) and
``python -m bench.report`` includes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from regproxy_cli.data.streets import render_street
from regproxy_cli.hub.checkpoint import save_pretrained
from regproxy_cli.model.regproxy import build_model

from .common import REPO, machine, median

REPORT = REPO / "docs" / "scale_throughput.json"  # bench.report puts it into docs/benchmarks.md
BEGIN, END = "<!-- scale-throughput -->", "<!-- /scale-throughput -->"
SIZES = ((240, 320), (320, 240), (256, 256))  # mixed sizes, as a folder of photos has them


def write_images(folder: Path, count: int) -> None:
    """``count`` street scenes, JPEG, in three sizes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        image = render_street(rng, SIZES[index % len(SIZES)])[0]
        Image.fromarray(image).save(folder / f"street{index:04d}.jpg", quality=90)


def commands(images: Path, model: Path, address: str) -> dict[str, list[str]]:
    predict = ["-m", "regproxy_cli", "predict", str(images), "--model", str(model), "--device", "cpu"]
    return {
        "predict": [sys.executable, *predict],
        "torchrun x2": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        *predict],
        "ray x1": [sys.executable, *predict, "--engine", "ray", "--address", address, "--workers", "1"],
        "ray x2": [sys.executable, *predict, "--engine", "ray", "--address", address, "--workers", "2"],
    }


def run(command: list[str], out: Path) -> float:
    if out.exists():
        shutil.rmtree(out)
    begin = time.perf_counter()
    result = subprocess.run([*command, "--out", str(out)], check=False, capture_output=True, text=True)
    seconds = time.perf_counter() - begin
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds


def identical(reference: Path, other: Path) -> bool:
    names = sorted(p.name for p in reference.iterdir() if p.suffix == ".png")
    return names == sorted(p.name for p in other.iterdir() if p.suffix == ".png") and all(
        (reference / n).read_bytes() == (other / n).read_bytes() for n in names)


def section(result: dict) -> str:
    info, rows = result["machine"], result["rows"]
    plain = rows["predict"]["images_per_s"]
    lines = [
        BEGIN,
        "## Predict at scale (`torchrun`, `--engine ray`)",
        "",
        (f"`python -m bench.scale_throughput` (under `flock /tmp/regproxy-bench.lock`): {result['images']} generated "
         f"street scenes (JPEG, {', '.join(f'{h}x{w}' for h, w in SIZES)}), ViT-Demo/8 RegProxy (5 classes, random "
         "weights), label PNG + overlay per image, on the CPU. Each figure is the whole command, start to exit, "
         f"median of {result['rounds']} rounds run in rotating order; Ray connects to a 2-CPU local cluster that "
         "was already running. Machine: "
         f"{info['cpu']}, {info['cores']} cores shared with other jobs; torch {info['versions']['torch']}, "
         f"ray {result['ray']}."),
        "",
        "| engine | seconds | images/s | vs plain predict | outputs identical to predict |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['seconds']:.1f} | {row['images_per_s']:.2f} | "
                     f"{row['images_per_s'] / plain:.2f}x | {'yes' if row['identical'] else 'NO'} |")
    overhead = 100 * (rows["ray x1"]["seconds"] / rows["predict"]["seconds"] - 1)
    lines += ["", f"Ray's overhead over plain predict at one worker: {overhead:+.1f}% of the run's time.", END]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """docs/scale_throughput.json, then docs/benchmarks.md rebuilt around it (bench.report)."""
    from bench import report

    body = "\n".join(line for line in text.splitlines() if line not in (BEGIN, END) and not line.startswith("## "))
    REPORT.write_text(json.dumps({"source": "python -m bench.scale_throughput", "section": body.strip()}, indent=2,
                                 ensure_ascii=False) + "\n")
    results = report.REPO / "docs" / "benchmarks.json"
    report.write_report(json.loads(results.read_text()), report.REPO / "docs" / "benchmarks.md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/scale_throughput.json or docs/benchmarks.md")
    args = parser.parse_args(argv)
    import ray

    work = Path(tempfile.mkdtemp(prefix="regproxy-scale-"))
    try:
        write_images(work / "images", args.images)
        torch.manual_seed(0)
        save_pretrained(build_model("demo8", 5), work / "model")
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        contenders = commands(work / "images", work / "model", address)
        names = list(contenders)
        times: dict[str, list[float]] = {name: [] for name in names}
        for name in names:  # untimed: the page cache holds the images and the imports, as for every timed run
            run(contenders[name], work / name.replace(" ", ""))
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                seconds = run(contenders[name], work / name.replace(" ", ""))
                times[name].append(seconds)
                print(f"round {round_index + 1} {name}: {seconds:.1f} s", flush=True)
        rows = {}
        for name in names:
            seconds = median(times[name])
            rows[name] = {"seconds": seconds, "all_s": times[name], "images_per_s": args.images / seconds,
                          "identical": identical(work / "predict", work / name.replace(" ", ""))}
        result = {"images": args.images, "rounds": args.rounds, "machine": machine(), "ray": ray.__version__,
                  "rows": rows}
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_write:
        write_section(section(result))
        print(f"wrote {os.path.relpath(REPORT)}")


if __name__ == "__main__":
    main()
