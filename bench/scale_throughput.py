"""`regproxy predict` at scale on one machine: plain predict, `torchrun` with 2 processes, and `--engine ray` with 1
and 2 CPU workers, on the same folder of generated street scenes of mixed sizes.

    flock /tmp/regproxy-bench.lock python -m bench.scale_throughput               # 200 images, 3 rounds
    flock /tmp/regproxy-bench.lock python -m bench.scale_throughput --images 40 --rounds 1 --large 0 --no-write

Every contender is the command a user runs, timed from start to exit (Python start-up, loading the model, and for
Ray connecting to the cluster and starting its actors, are part of it). The Ray runs connect with ``--address`` to a
local cluster (``ray start --head --num-cpus 2``) started for them and warmed by one untimed run: its start-up is not
counted, as a cluster is up before jobs come. Plain predict and torchrun run with no cluster up: an idle Ray cluster
takes CPU time (its GCS, raylet and Ray Data's service actors), and on 2 cores that slows torch's 2 threads a lot.
One untimed run of each contender comes first; then they run round after round in a rotating order (bench.common's
protocol) within each group, and each run writes into a fresh folder; every engine's label PNGs and overlays are
compared byte for byte with plain predict's. The model is ViT-Demo/8 RegProxy (5 classes) with random weights, saved as a model directory (a
forward's speed does not depend on the values); every image is segmented at its own size. The section "Predict at
scale" of docs/benchmarks.md comes from docs/scale_throughput.json, which this writes (unless ``--no-write``) and
``python -m bench.report`` includes.

Ray's cost over plain predict is mostly fixed (connecting, then starting an actor process that imports torch and
loads the model, after the driver has done the same), so ``--large N`` (default 1000) also times plain predict and
Ray with one worker once each on a folder of N images: the overhead that remains when the start-up is spread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


RAY = str(Path(sys.executable).with_name("ray"))  # the ray command of this environment


@contextlib.contextmanager
def cluster(warm: list[str], out: Path) -> Iterator[None]:
    """``ray start --head --num-cpus 2`` while in the ``with`` block, warmed by one untimed run ``warm``; ``ray stop``
    after (which stops every Ray cluster of this machine: run the bench where no other is needed). The jobs find it
    with ``--address auto``, as docs/scale.md tells users to, which also hands them the cluster's auth token."""
    subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--include-dashboard", "false",
                    "--disable-usage-stats"], check=True, capture_output=True)
    try:
        run(warm, out)  # the first Ray Data job starts the cluster's service actors
        yield
    finally:
        subprocess.run([RAY, "stop", "--force"], check=False, capture_output=True)


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
         "was already running (and warmed by one job); plain predict and torchrun ran with no cluster up. Machine: "
         f"{info['cpu']} ({', '.join(info['isa'])}), {info['cores']} cores, load average "
         f"{result['load_before']:.1f} before the run; torch {info['versions']['torch']}, "
         f"ray {result['ray']}."),
        "",
        "| engine | seconds | images/s | vs plain predict | outputs identical to predict |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['seconds']:.1f} | {row['images_per_s']:.2f} | "
                     f"{row['images_per_s'] / plain:.2f}x | {'yes' if row['identical'] else 'NO'} |")
    overhead = 100 * (rows["ray x1"]["seconds"] / rows["predict"]["seconds"] - 1)
    lines += ["", f"Ray's overhead over plain predict at one worker: {overhead:+.1f}% of the run's time."]
    large = result.get("large")
    if large:
        big = 100 * (large["ray x1"] / large["predict"] - 1)
        lines += [f"On a folder of {large['images']} such images (one run each, in one sitting): plain predict "
                  f"{large['predict']:.1f} s, Ray with one worker {large['ray x1']:.1f} s, an overhead of {big:+.1f}%."]
    lines.append(END)
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
    parser.add_argument("--large", type=int, default=1000,
                        help="also time predict and ray x1 once on this many images (0: not)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/scale_throughput.json or docs/benchmarks.md")
    args = parser.parse_args(argv)
    import ray

    load_before = os.getloadavg()[0]  # other jobs on the same cores move these timings a lot
    work = Path(tempfile.mkdtemp(prefix="regproxy-scale-"))
    try:
        write_images(work / "images", args.images)
        torch.manual_seed(0)
        save_pretrained(build_model("demo8", 5), work / "model")
        address = "auto"
        contenders = commands(work / "images", work / "model", address)
        names = list(contenders)
        groups = [names[:2], names[2:]]  # without a cluster; with one
        times: dict[str, list[float]] = {name: [] for name in names}
        for group in groups:
            with cluster(contenders["ray x1"], work / "warm") if "ray" in group[0] else contextlib.nullcontext():
                for name in group:  # untimed: the page cache holds the images and the imports, as for every run
                    run(contenders[name], work / name.replace(" ", ""))
                for round_index in range(args.rounds):
                    shift = round_index % len(group)
                    for name in group[shift:] + group[:shift]:
                        seconds = run(contenders[name], work / name.replace(" ", ""))
                        times[name].append(seconds)
                        print(f"round {round_index + 1} {name}: {seconds:.1f} s", flush=True)
        rows = {}
        for name in names:
            seconds = median(times[name])
            rows[name] = {"seconds": seconds, "all_s": times[name], "images_per_s": args.images / seconds,
                          "identical": identical(work / "predict", work / name.replace(" ", ""))}
        result = {"images": args.images, "rounds": args.rounds, "machine": machine(), "ray": ray.__version__,
                  "rows": rows, "load_before": load_before}
        if args.large:
            write_images(work / "large", args.large)
            large = commands(work / "large", work / "model", address)
            result["large"] = {"images": args.large}
            result["large"]["predict"] = run(large["predict"], work / "large-predict")
            with cluster(contenders["ray x1"], work / "warm"):
                result["large"]["ray x1"] = run(large["ray x1"], work / "large-rayx1")
            for name in ("predict", "ray x1"):
                print(f"{args.large} images, {name}: {result['large'][name]:.1f} s", flush=True)
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
