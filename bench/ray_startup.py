"""Where `--engine ray` loses time against plain predict: when each writes its first and last image, for this tree
and an earlier revision, alternated in one sitting (Ray's figures on a 2-core machine move between sittings more than
the changes being compared).

    flock /tmp/regproxy-bench.lock python -m bench.ray_startup --base 1ba1f04            # 200 images, 2 rounds
    flock /tmp/regproxy-bench.lock python -m bench.ray_startup --base HEAD~1 --images 40 --rounds 1 --runs 1

For each tree (``--base`` is checked out into a temporary git worktree) and round: plain predict ``--runs`` times with
no cluster up, then a fresh ``ray start --head --num-cpus 2`` with that tree first on ``PYTHONPATH`` (so the actors
and read tasks import the same code as the driver), one untimed job, and ``--runs`` timed jobs with one worker. Each
job is timed from start to exit; the first and last image come from the output files' modification times. Prints a
table and, with ``--json``, writes the numbers. Same images and model as ``bench.scale_throughput``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from regproxy_cli.hub.checkpoint import save_pretrained
from regproxy_cli.model.regproxy import build_model

from .common import REPO, machine, median
from .scale_throughput import cluster, commands, run, write_images


def timed(command: list[str], out: Path) -> dict[str, float]:
    """One job (bench.scale_throughput's ``run``): seconds to exit, and to its first and last label PNG or overlay."""
    seconds = run(command, out)
    begin = time.time() - seconds  # the job's start on the clock the files' modification times use
    written = sorted(p.stat().st_mtime for p in out.glob("*.png"))
    return {"total": seconds, "first": written[0] - begin, "last": written[-1] - begin}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare this tree with (git rev)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2, help="timed jobs per engine, tree and round")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="regproxy-ray-startup-"))
    base = work / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.base], check=True,
                   capture_output=True)
    backbones = str(REPO / "backbones")
    trees = {f"base {args.base}": str(base), "this tree": str(REPO)}
    results: dict[str, dict[str, list[dict[str, float]]]] = {t: {"predict": [], "ray x1": []} for t in trees}
    saved = os.environ.get("PYTHONPATH")
    try:
        write_images(work / "images", args.images)
        torch.manual_seed(0)
        save_pretrained(build_model("demo8", 5), work / "model")
        jobs = commands(work / "images", work / "model", "auto")
        for round_index in range(args.rounds):
            for name, tree in trees.items():
                os.environ["PYTHONPATH"] = os.pathsep.join([tree, backbones])  # driver, actors and read tasks alike
                for _ in range(args.runs):
                    results[name]["predict"].append(timed(jobs["predict"], work / "out"))
                with cluster(jobs["ray x1"], work / "warm"):
                    for _ in range(args.runs):
                        results[name]["ray x1"].append(timed(jobs["ray x1"], work / "out"))
                print(f"round {round_index + 1} {name}: " + ", ".join(
                    f"{engine} {runs[-1]['total']:.1f} s" for engine, runs in results[name].items()), flush=True)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False,
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'tree':<24} {'engine':<8} {'first image s':>14} {'last image s':>13} {'exit s':>8}  (medians)")
    for name, engines in results.items():
        for engine, runs in engines.items():
            print(f"{name:<24} {engine:<8} " + " ".join(
                f"{median([run[key] for run in runs]):>{width}.1f}"
                for key, width in (("first", 14), ("last", 13), ("total", 8))))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "images": args.images, "results": results}, indent=2)
                             + "\n")


if __name__ == "__main__":
    main()
