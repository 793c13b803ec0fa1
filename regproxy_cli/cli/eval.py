"""``regproxy eval``: mIoU / mAcc / aAcc of a model on a dataset, as mmsegmentation computes them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from regproxy_cli.cli.options import (
    CompileOption,
    DeviceOption,
    JsonOption,
    ModelOption,
    ModeOption,
    Precision,
    PrecisionOption,
    Provider,
    ProviderOption,
    TtaOption,
    WindowBatchOption,
    check_precision,
    check_window_batch,
    model_device,
    start_runtime,
)
from regproxy_cli.cli.output import console, err_console, print_json
from regproxy_cli.errors import RegproxyError

SUMMARY = "Evaluate a model on a dataset: mIoU, mAcc, aAcc as mmsegmentation computes them."
HELP = """Evaluate a model (zoo name, Hub repo id, model directory, .pth, or .onnx run by onnxruntime on --provider)
on a dataset: a training config
(its data section) or a dataset folder (ADE20K, Cityscapes, Pascal Context or the folder format).
Uses the model's own protocol (test scale, whole or sliding window); --tta adds the paper's multi-scale
(0.5-1.75) + flip test. Under torchrun each process evaluates a share of the images on its own GPU (gloo on CPUs)
and the counts are summed: the result equals a single process's.

--report DIR writes a folder to share (zip it; report.html opens offline): metrics.json (mIoU, mAcc, aAcc,
boundary F-score, per-class IoU/Acc/F1/BF, every image's score), confusion_matrix.csv and a heat-map (with more
than 30 classes, the 30 most confused), sorted per-class IoU bars, and strips of the --worst N images by per-image
mIoU (image | ground truth | prediction | errors). A folder that holds other files is refused; an earlier report
is replaced. Needs matplotlib: pip install 'regproxy[report]'."""

EXAMPLES = """[bold]Examples[/]

  regproxy eval --model runs/demo/best --data configs/demo.yaml

  regproxy eval --model s16-ade --data /data/ADEChallengeData2016 --tta --json

  regproxy eval --model runs/demo/best --data configs/demo.yaml --report runs/demo/report --worst 8

  torchrun --nproc-per-node 8 -m regproxy_cli eval --model s16-ade --data /data/ADEChallengeData2016"""


def eval_command(
    model: ModelOption,
    data: Annotated[str, typer.Option("--data", help="Training config (.yaml) or dataset folder.")],
    split: Annotated[str | None, typer.Option(help="Split to evaluate (default: the config's val split / val).")] = None,
    mode: ModeOption = None,
    tta: TtaOption = False,
    device: DeviceOption = "auto",
    window_batch: WindowBatchOption = 8,
    precision: PrecisionOption = Precision.fp32,
    compile_network: CompileOption = False,
    provider: ProviderOption = Provider.cpu,
    save_predictions: Annotated[Path | None, typer.Option(help="Write label PNGs here.")] = None,
    as_json: JsonOption = False,
    report: Annotated[Path | None, typer.Option(
        help="Write a report folder: metrics.json, confusion matrix (CSV, PNG), IoU bars, worst images, report.html."
    )] = None,
    worst: Annotated[int | None, typer.Option(
        help="With --report: strips of this many images with the lowest per-image mIoU (default 8).")] = None,
) -> None:
    from regproxy_cli.engine.distributed import shutdown
    from regproxy_cli.engine.evaluate import evaluate, open_eval_dataset
    from regproxy_cli.engine.report import ReportCollector, check_report_dir, write_report
    from regproxy_cli.engine.runner import open_model
    from regproxy_cli.plots import require_matplotlib

    check_window_batch(window_batch)
    if worst is not None and report is None:
        raise RegproxyError("--worst needs --report DIR")
    if worst is not None and worst < 0:
        raise RegproxyError(f"--worst must be 0 or more, got {worst}")
    if report is not None:  # before the evaluation, which may take hours
        require_matplotlib("eval --report")
        check_report_dir(report)
    runtime = start_runtime(model_device(device, model))  # under torchrun: the process group, and this process's GPU
    dataset = open_eval_dataset(data, split)
    run_precision = check_precision(precision, runtime.device)
    segmenter = open_model(model, runtime.device, precision=run_precision, provider=provider.value,
                           compile_network=compile_network, status=err_console.status)
    collector = None if report is None else ReportCollector(segmenter.config.num_classes, 8 if worst is None else worst)
    result = evaluate(segmenter, dataset, mode=mode.value if mode else None, tta=tta, batch_size=window_batch,
                      precision=run_precision, save_dir=save_predictions, progress=not as_json, report=collector)
    shutdown()
    if not runtime.main:  # the result is the same on every process; one prints it (and writes the report)
        return
    if report is not None:
        evaluation = {"model": str(model), "data": data, "split": split, "mode": mode.value if mode else None,
                      "tta": tta, "precision": run_precision}
        write_report(report, result, collector, dataset, segmenter.config, evaluation)
    classes = segmenter.config.classes
    if as_json:
        print_json({**{k: result[k] for k in ("mIoU", "mAcc", "aAcc", "images")},
                    "per_class": {c: {"IoU": i, "Acc": a} for c, i, a in zip(classes, result["IoU"], result["Acc"])},
                    **({"levels": result["levels"]} if "levels" in result else {})})
    else:
        table = Table(title="Per-class IoU / Acc (%)", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False)
        for column in ("class", "IoU", "Acc"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for name, iou, acc in zip(classes, result["IoU"], result["Acc"]):
            table.add_row(name, "-" if iou is None else f"{iou:.2f}", "-" if acc is None else f"{acc:.2f}")
        console.print(table)
        console.print(f"[bold]mIoU {result['mIoU']:.2f}[/]  mAcc {result['mAcc']:.2f}  aAcc {result['aAcc']:.2f}  "
                      f"({result['images']} images{', multi-scale + flip' if tta else ''})")
        for level, scores in result.get("levels", {}).items():  # a hierarchical classifier's coarser levels
            ious = ", ".join(f"{c} {'-' if i is None else f'{i:.1f}'}" for c, i in zip(scores["classes"], scores["IoU"]))
            console.print(f"[bold]{level} mIoU {scores['mIoU']:.2f}[/]  ({ious})")
    if report is not None:  # stderr under --json, so stdout stays one JSON document
        (err_console if as_json else console).print(f"report: {report / 'report.html'}")
