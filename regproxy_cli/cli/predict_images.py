"""``regproxy predict photos/``: the image half of predict, in this process (under torchrun: each process a share,
:func:`regproxy_cli.engine.runner.predict_shard`) or on a Ray cluster (:mod:`regproxy_cli.engine.scale`); a
progress bar, the one summary and the exit status. ``regproxy_cli.cli.predict`` parses the options and hands
images here."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer

from regproxy_cli.cli.options import (
    Precision,
    check_batch,
    check_precision,
    check_window_batch,
    model_device,
    start_runtime,
)
from regproxy_cli.cli.output import console, err_console, print_classes_present, print_error
from regproxy_cli.errors import RegproxyError


class RegionsBy(str, Enum):
    """How --regions tints each learned region: its token's predicted class, or a colour per token."""

    cls = "class"
    token = "token"
    prototype = "prototype"


class Engine(str, Enum):
    """Where predict runs: this process (each of torchrun's a share), or a Ray cluster's actors."""

    local = "local"
    ray = "ray"


RAY_ONLY = {"--address": None, "--workers": None, "--gpus-per-worker": 0.0}  # the options and their defaults


def check_options(*, window_batch: int, batch: int, opacity: float, prototypes: bool, regions_by: RegionsBy | None,
                  engine: Engine, address: str | None, workers: int | None,
                  gpus_per_worker: float) -> RegionsBy | None:
    """predict's options that go together, checked before anything loads; returns --regions-by as --prototypes
    sets it."""
    from regproxy_cli.engine.outputs import check_opacity

    if prototypes:
        if regions_by not in (None, RegionsBy.prototype):
            raise RegproxyError(f"--prototypes colours regions by prototype; it cannot go with --regions-by "
                                f"{regions_by.value}")
        regions_by = RegionsBy.prototype
    check_window_batch(window_batch)
    check_batch(batch)
    check_opacity(opacity)
    given = [name for name, value in zip(RAY_ONLY, (address, workers, gpus_per_worker)) if value != RAY_ONLY[name]]
    if engine is Engine.local and given:
        raise RegproxyError(f"{', '.join(given)} go with --engine ray")
    return regions_by


def predict_images(inputs: list[str], *, model: str, out: Path, device: str, precision: Precision, provider: str,
                   compile_network: bool, formats: list[str], **options: Any) -> None:
    """Segment the images in this process, or in each of torchrun's a share (rank 0 prints the summary)."""
    from tqdm import tqdm

    from regproxy_cli.data.formats import check_formats
    from regproxy_cli.engine.distributed import shutdown
    from regproxy_cli.engine.outputs import check_out_dir, expand_inputs, prepare_out_dir
    from regproxy_cli.engine.runner import PredictReport, check_shardable, open_model, predict_shard

    output_formats = check_formats(formats)  # a missing extra stops here, before loading
    runtime = start_runtime(model_device(device, model))  # under torchrun: the process group, this process's device
    check_shardable(output_formats, runtime.world)
    run_precision = check_precision(precision, runtime.device)
    paths, problems = expand_inputs(inputs)
    check_out_dir(out)  # an --out that is a file or cannot be written stops here, before the model loads
    segmenter = open_model(model, runtime.device, precision=run_precision, provider=provider,
                           compile_network=compile_network, regions=options["regions"], status=err_console.status)
    prepare_out_dir(out)  # created only once the model has loaded, and before the progress bar shows
    partial = PredictReport()  # filled as images finish: what a Ctrl-C can report
    share = len(paths[runtime.rank::runtime.world])
    try:
        with tqdm(total=share, unit="image", desc="segmenting", disable=not share or not runtime.main) as bar:
            report = predict_shard(segmenter, paths, out, progress=bar.update, formats=output_formats,
                                   precision=run_precision, report=partial, **options)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: {len(partial.finished)} of {share} images written to {out} (each file "
                          "complete); run the same command again to segment them all")
        raise typer.Exit(130) from None
    shutdown()
    if runtime.main:
        for problem in problems + report.failed:
            print_error(problem)
        if report.written:
            print_classes_present(segmenter.config.classes, report.pixels, report.images, "images")
            console.print(f"wrote {len(report.written)} label maps to {out}")
    if runtime.main and (problems or report.failed or not report.written):  # torchrun reports rank 0's status
        raise typer.Exit(1)


def predict_on_ray(inputs: list[str], *, model: str, out: Path, compile_network: bool, **options: Any) -> None:
    """Segment the images on a Ray cluster; the summary: images, skipped, failures (OUT/failures.jsonl), images/s."""
    from regproxy_cli.engine.scale import FAILURES_FILE, predict_ray

    if compile_network:
        raise RegproxyError("--compile applies to --engine local; Ray's actors run the model as loaded")
    problems: list[str] = []
    try:
        report = predict_ray(inputs, model, out, problems=problems, **options)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: every file in {out} is complete; run the same command again to continue")
        raise typer.Exit(130) from None
    for problem in problems + report.failed:
        print_error(problem)
    if report.written:
        print_classes_present(report.classes, report.pixels, report.images, "images")
    skipped = f", {report.skipped} already complete" if report.skipped else ""
    console.print(f"wrote {report.written} images to {out} on {report.workers} Ray workers in {report.seconds:.1f} s "
                  f"({report.images_per_s:.2f} images/s){skipped}; {len(report.failed)} failed "
                  f"({out / FAILURES_FILE})")
    if problems or report.failed or not (report.written or report.skipped):
        raise typer.Exit(1)
