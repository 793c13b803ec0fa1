"""`regproxy predict` on a folder: the sequential loop against the pipelined one (reading and writing on threads).

    python -m bench.folder_throughput --images /tmp/camvid200       # Ti/16, S/16, demo8, Ti/16 on 1 torch thread
    python -m bench.folder_throughput --images DIR --backbones demo8 --rounds 3 --no-write

Both run ``predict_files`` (what ``regproxy predict`` calls) on the same images in one process, on chunks of
images that both paths run back to back in alternating order; ``workers=0`` is the sequential path, ``workers=N``
the pipelined one. Each model is built with random weights and saved and loaded as a model directory (the speed of
a forward does not depend on the values); it has no test scale, so every image is segmented at its own size (whole
by default). The outputs of the two paths are compared byte for byte. The section "Folder throughput" of
docs/benchmarks.md is replaced (or appended) unless ``--no-write``; bench/report.py rebuilds that file from
docs/benchmarks.json, so rerun this after it. About 7 minutes on 2 cores for 200 photos.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from regproxy_cli.engine.outputs import expand_inputs
from regproxy_cli.engine.runner import predict_files
from regproxy_cli.hub.checkpoint import save_pretrained
from regproxy_cli.hub.zoo import load_model
from regproxy_cli.images import load_image, save_label_png, save_png_atomic
from regproxy_cli.inference.predictor import predict_labels
from regproxy_cli.model.regproxy import build_model
from regproxy_cli.viz import overlay

from .common import REPO, interleaved, machine, median

REPORT = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- folder-throughput -->", "<!-- /folder-throughput -->"
TITLES = {"demo8": "ViT-Demo/8 RegProxy (5 classes)", "s16": "RegProxy-S/16 (150 classes)",
          "t16": "RegProxy-Ti/16 (150 classes)"}
CLASSES = {"demo8": 5}


def stages(model, paths: list[Path], out: Path, mode: str, repeats: int = 3) -> dict[str, float]:
    """Seconds per image of each stage, run one after the other: decode, network, writing the PNGs; the fastest of
    ``repeats`` runs (other jobs on a shared machine only ever slow a run down)."""
    palette = np.array(model.config.palette, dtype=np.uint8)
    best = {"decode": float("inf"), "network": float("inf"), "write": float("inf")}
    for _ in range(repeats):
        begin = time.perf_counter()
        images = [load_image(p) for p in paths]
        decoded = time.perf_counter()
        labels = [predict_labels(model, image, mode=mode) for image in images]
        inferred = time.perf_counter()
        for path, image, label in zip(paths, images, labels):
            save_label_png(out / f"{path.stem}.png", label, palette)
            save_png_atomic(out / f"{path.stem}_overlay.png", overlay(image, label, palette))
        written = time.perf_counter()
        for stage, seconds in (("decode", decoded - begin), ("network", inferred - decoded),
                               ("write", written - inferred)):
            best[stage] = min(best[stage], seconds / len(paths))
    return best


def measure(spec: str, paths: list[Path], work: Path, *, rounds: int, chunk: int, workers: int, mode: str) -> dict:
    """Both paths on every chunk of ``chunk`` images, back to back in alternating order (paired: the load of a
    shared machine hits both alike), ``rounds`` times over the folder. ``spec``: a backbone, or BACKBONE:THREADS
    to run torch on that many threads (leaving cores to the pipeline's threads)."""
    backbone, _, threads = spec.partition(":")
    default_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads) if threads else default_threads)
    directory = work / f"model-{spec}"
    save_pretrained(build_model(backbone, CLASSES.get(backbone, 150)), directory)  # random weights
    model = load_model(directory)
    outs = {"sequential": work / f"{spec}-sequential", "pipelined": work / f"{spec}-pipelined"}
    predict_files(model, paths[:2], work / "warm-up", mode=mode)
    times: dict[str, list[float]] = {"sequential": [], "pipelined": []}
    counts = []  # images per chunk
    for round_index in range(rounds):
        for first in range(0, len(paths), chunk):
            some = paths[first:first + chunk]
            counts.append(len(some))
            contenders = {
                "sequential": partial(predict_files, model, some, outs["sequential"], workers=0, mode=mode),
                "pipelined": partial(predict_files, model, some, outs["pipelined"], workers=workers, mode=mode),
            }
            if (round_index + first // chunk) % 2:
                contenders = dict(reversed(contenders.items()))
            for name, seconds in interleaved(contenders, rounds=1, warmup=0).items():
                times[name] += seconds
    names = sorted(p.name for p in outs["sequential"].iterdir())
    identical = names == sorted(p.name for p in outs["pipelined"].iterdir()) and all(
        (outs["sequential"] / n).read_bytes() == (outs["pipelined"] / n).read_bytes() for n in names)
    stage_out = work / f"{spec}-stages"
    stage_out.mkdir()
    row = {
        "backbone": backbone, "threads": torch.get_num_threads(), "mode": mode, "images": len(paths),
        "rounds": rounds, "chunk": chunk, "workers": workers, "size": list(load_image(paths[0]).shape[:2]),
        "identical": identical,
        "sequential_s": times["sequential"], "pipelined_s": times["pipelined"],
        # the median chunk's rate: a burst of other jobs on a shared machine slows a chunk, not the figure
        "sequential_images_per_s": median([n / t for n, t in zip(counts, times["sequential"])]),
        "pipelined_images_per_s": median([n / t for n, t in zip(counts, times["pipelined"])]),
        "ratio": median([s / p for s, p in zip(times["sequential"], times["pipelined"])]),
        "stages_ms": {k: 1000 * v for k, v in stages(model, paths[:20], stage_out, mode).items()},
    }
    torch.set_num_threads(default_threads)
    print(row, flush=True)
    return row


def section(rows: list[dict], info: dict, source: str, seconds: float, load: tuple[float, float]) -> str:
    lines = [
        BEGIN,
        "## Folder throughput (`regproxy predict`)",
        "",
        (f"`python -m bench.folder_throughput` on {source}: `predict_files` (what `regproxy predict` runs: decode, "
         f"segment ({rows[0]['mode']}) at the image's own size, write the label PNG and the overlay PNG) sequentially "
         "(`workers=0`) against the pipelined path (decoding on worker threads, PNG writing on a writer thread, "
         f"the network on the main thread), timed in one process on chunks of {rows[0]['chunk']} images, each chunk by "
         "both paths back to back in alternating order; random weights. Machine: "
         f"{info['cpu']}, {info['cores']} cores, torch "
         f"{info['versions']['torch']}; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end "
         "(other jobs shared the cores)."),
        "",
        ("| model | torch threads | images | size | sequential images/s | pipelined images/s | ratio "
         "| outputs identical | decode / network / write ms per image |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    hidden = [100 * (r["stages_ms"]["decode"] + r["stages_ms"]["write"]) / r["stages_ms"]["network"] for r in rows]
    low, high = min(hidden), max(hidden)
    for r in rows:
        stage = r["stages_ms"]
        lines.append(
            f"| {TITLES.get(r['backbone'], r['backbone'])} | {r['threads']} | {r['images'] * r['rounds']} | "
            f"{r['size'][0]}×{r['size'][1]} | {r['sequential_images_per_s']:.2f} | {r['pipelined_images_per_s']:.2f} | "
            f"**{r['ratio']:.2f}×** | {'yes' if r['identical'] else 'NO'} | "
            f"{stage['decode']:.1f} / {stage['network']:.1f} / {stage['write']:.1f} |")
    lines += [
        "",
        ("images/s: the median over chunks; ratio: the median over chunks of sequential time / pipelined time "
         "(paired, so the load of a shared machine hits both alike). The stage times (first 20 images, one stage "
         "after the other, the fastest of 3 runs) show what there is to hide: decoding and writing take "
         f"{low:.0f}-{high:.0f}% of the network's time here. The pipeline hides them only on a core that the network leaves free: with torch "
         "on every core the threads compete with torch's own and the ratio is about 1, with torch on fewer "
         "threads than cores (or the network on a GPU) it overlaps them."),
        "",
        f"<sub>cpu, {time.strftime('%Y-%m-%d')}, {seconds:.0f} s</sub>",
        END,
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    report = REPORT.read_text()
    if BEGIN in report and END in report:
        head, rest = report.split(BEGIN, 1)
        report = head + text + rest.split(END, 1)[1]
    else:
        report = report.rstrip("\n") + "\n\n" + text + "\n"
    REPORT.write_text(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="a folder of photos (e.g. CamVid's test set)")
    parser.add_argument("--source", default=None, help="how the report names the photos")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--backbones", nargs="+", default=["t16", "s16", "demo8", "t16:1"],
                        help="backbones (random weights), BACKBONE:THREADS for a torch thread count")
    parser.add_argument("--rounds", type=int, nargs="+", default=[1], help="per backbone, or one for all")
    parser.add_argument("--chunk", type=int, default=20, help="images per paired timing")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mode", choices=["whole", "slide"], default="whole",
                        help="whole (default) or the model's crop-size sliding windows")
    parser.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    args = parser.parse_args()
    paths, problems = expand_inputs([args.images])
    if problems or not paths:
        sys.exit(f"{args.images}: no images")
    paths = paths[: args.limit]
    rounds = args.rounds * len(args.backbones) if len(args.rounds) == 1 else args.rounds
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(b, paths, Path(work), rounds=r, chunk=args.chunk, workers=args.workers, mode=args.mode)
                for b, r in zip(args.backbones, rounds)]
    text = section(rows, machine(), args.source or f"{len(paths)} photos from {args.images}",
                   time.perf_counter() - started, (load, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
