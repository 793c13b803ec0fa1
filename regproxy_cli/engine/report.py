"""Reports: ``regproxy eval --report DIR`` (a shareable folder of metrics, plots and the worst images) and the
points of ``regproxy flops --plot`` (the paper's Fig. 2, with the user's runs on it).

The report folder holds ``report.html`` (no scripts, no external resources, every link relative, so the folder can
be zipped and opened anywhere), ``metrics.json``, ``confusion_matrix.csv`` (pixel counts, rows = ground truth,
columns = prediction), the figures, ``worst/`` (one strip per image: image | ground truth | prediction | errors)
and a marker file. A folder with the marker is a report and is replaced whole; any other non-empty folder is the
user's and is never written to. The new report is written to a temporary folder beside it and swapped in by two
renames.

The worst images are those with the lowest per-image mIoU: the mean IoU over the classes present in that image's
ground truth or prediction (ties: lower pixel accuracy first). Images without a labelled pixel have no score and
are never among them. Under torchrun every process keeps its own worst images and their predictions; the small
per-image scores and those candidates are gathered, so the report equals a single process's.
"""

from __future__ import annotations

import csv
import heapq
import html
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

from regproxy_cli import plots
from regproxy_cli.constants import IGNORE_INDEX, VERSION
from regproxy_cli.engine.distributed import all_gather_objects
from regproxy_cli.engine.metrics import BoundaryFScore, ConfusionMatrix
from regproxy_cli.errors import RegproxyError
from regproxy_cli.files import read_json
from regproxy_cli.hub.zoo import ZOO
from regproxy_cli.model.config import CONFIG_NAME, ModelConfig
from regproxy_cli.model.flops import count_flops
from regproxy_cli.viz import colorize

REPORT_MARKER = ".regproxy-report"
WORST_BY = "per-image mIoU (ties: pixel accuracy)"
BOUNDARY_TOLERANCE_PX = 2
_RIGHT, _WRONG, _IGNORED = (0, 170, 0), (220, 0, 0), (128, 128, 128)


# ---------------------------------------------------------------------------------------------------------------
# Collecting during evaluation
# ---------------------------------------------------------------------------------------------------------------


def image_scores(prediction: np.ndarray, label: np.ndarray, num_classes: int,
                 ignore_index: int = IGNORE_INDEX) -> tuple[float, float]:
    """(mIoU, pixel accuracy) of one image, fractions; the mean runs over the classes present in its ground truth
    or prediction. NaN for both when the image has no labelled pixel."""
    valid = label != ignore_index
    if not valid.any():
        return math.nan, math.nan
    gt, pred = label[valid].astype(np.int64), prediction[valid].astype(np.int64)
    matrix = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, -1)
    intersection = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean()), float(intersection.sum() / valid.sum())


class ReportCollector:
    """What ``eval --report`` needs beyond the confusion matrix: boundary counts, per-image scores, and the worst
    images' predictions. :func:`regproxy_cli.engine.evaluate.evaluate` feeds it and gathers it across processes.

    Args:
        num_classes: K.
        worst: how many of the lowest-scoring images to keep (with their predictions) for the strips.
        tolerance_px: the boundary F-score's matching distance.
    """

    def __init__(self, num_classes: int, worst: int = 8, tolerance_px: int = BOUNDARY_TOLERANCE_PX) -> None:
        if worst < 0:
            raise RegproxyError(f"--worst must be 0 or more, got {worst}")
        self.num_classes = num_classes
        self.worst = worst
        self.boundary = BoundaryFScore(num_classes, tolerance_px)
        self.images: list[dict] = []  # {"index", "name", "mIoU", "pixel_acc"}, fractions
        self.confusion: np.ndarray | None = None
        # a max-heap (by negated key) of the `worst` lowest (mIoU, pixel_acc, index) and their predictions
        self._heap: list[tuple[float, float, int, np.ndarray]] = []

    def add(self, index: int, name: str, prediction: np.ndarray, label: np.ndarray) -> None:
        """Score one image of the dataset (``index`` is its position, the tie-breaker and key to re-read it)."""
        label = np.asarray(label)
        self.boundary.update(prediction, label.astype(np.int64))
        miou, acc = image_scores(prediction, label, self.num_classes)
        self.images.append({"index": index, "name": name, "mIoU": miou, "pixel_acc": acc})
        if self.worst and not math.isnan(miou):
            small = prediction.astype(np.uint8 if self.num_classes <= 256 else np.int16)
            heapq.heappush(self._heap, (-miou, -acc, -index, small))
            if len(self._heap) > self.worst:
                heapq.heappop(self._heap)  # drops the highest-scoring candidate

    def gather(self, matrix: ConfusionMatrix) -> None:
        """Take the dataset's (all-reduced) confusion matrix and merge every process's scores and candidates.

        Every process must call it, in the same order as the metric collectives.
        """
        self.confusion = matrix.matrix.cpu().numpy().astype(np.int64)
        self.boundary.all_reduce()
        candidates = [(-m, -a, -i, p) for m, a, i, p in self._heap]
        gathered = all_gather_objects((self.images, candidates))
        self.images = [image for images, _ in gathered for image in images]
        candidates = [c for _, cands in gathered for c in cands]
        self.images.sort(key=lambda image: image["index"])
        candidates.sort(key=lambda c: c[:3])
        self._worst = candidates[: self.worst]

    def worst_images(self) -> list[tuple[int, float, float, np.ndarray]]:
        """(dataset index, mIoU, pixel accuracy, prediction) of the worst images, worst first (after gather)."""
        return [(i, m, a, p) for m, a, i, p in self._worst]


# ---------------------------------------------------------------------------------------------------------------
# Writing the folder
# ---------------------------------------------------------------------------------------------------------------


def check_report_dir(path: str | os.PathLike) -> Path:
    """Refuse a target that is not ours to replace: a file, or a non-empty folder without the report marker."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RegproxyError(f"--report {path}: is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / REPORT_MARKER).is_file():
        raise RegproxyError(f"--report {path}: the folder holds other files (no {REPORT_MARKER}); "
                            "choose an empty or new folder")
    return path


def _percent(value: float) -> float | None:
    return None if value is None or math.isnan(value) else 100 * float(value)


def pixel_f1(confusion: np.ndarray) -> np.ndarray:
    """Per-class pixel F1 (Dice) from a confusion matrix: 2TP / (2TP + FP + FN); NaN for a class absent from both
    ground truth and prediction."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    denominator = confusion.sum(0) + confusion.sum(1)  # (TP + FP) + (TP + FN)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem)[:80] or "image"


def error_map(prediction: np.ndarray, label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W, 3) uint8: green where the prediction is right, red where wrong, grey where the pixel is ignored."""
    out = np.empty((*label.shape, 3), dtype=np.uint8)
    out[...] = _WRONG
    out[prediction == label] = _RIGHT
    out[label == ignore_index] = _IGNORED
    return out


def _colour_labels(labels: np.ndarray, palette: list, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    ignored = labels == ignore_index
    out = colorize(np.where(ignored, 0, labels), palette)
    out[ignored] = 0  # ignored ground truth is black
    return out


def write_report(path: str | os.PathLike, result: dict, collector: ReportCollector, dataset, config: ModelConfig,
                 evaluation: dict) -> Path:
    """Write the report folder (see the module docstring); returns its path. Call on one process only.

    Args:
        result: what :func:`~regproxy_cli.engine.evaluate.evaluate` returned.
        collector: the gathered collector of that evaluation.
        dataset: the evaluated dataset (the worst images are re-read from it).
        config: the model's config (class names, palette; saved in metrics.json for ``flops --plot --run``).
        evaluation: how it was evaluated (data, split, mode, tta, precision, model spec), saved as given.
    """
    plots.require_matplotlib("eval --report")
    path = check_report_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        _write_contents(tmp, result, collector, dataset, config, evaluation)
        (tmp / REPORT_MARKER).write_text(json.dumps({"regproxy": VERSION, "kind": "eval report"}) + "\n")
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_in(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing report there is moved aside first and removed after."""
    if not target.exists():
        os.rename(new, target)
        return
    check_report_dir(target)  # still ours (it may have changed during a long evaluation)
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    old.rmdir()
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_contents(folder: Path, result: dict, collector: ReportCollector, dataset, config: ModelConfig,
                    evaluation: dict) -> None:
    classes = list(config.classes)
    confusion = collector.confusion
    boundary = collector.boundary.compute()
    f1 = pixel_f1(confusion)
    per_class = {
        name: {"IoU": result["IoU"][c], "Acc": result["Acc"][c], "F1": _percent(f1[c]),
               "BF": _percent(boundary["F"][c]), "gt_pixels": int(confusion[c].sum()),
               "predicted_pixels": int(confusion[:, c].sum())}
        for c, name in enumerate(classes)
    }
    (folder / "worst").mkdir()
    worst = []
    for rank, (index, miou, acc, prediction) in enumerate(collector.worst_images(), start=1):
        image, label, name = dataset[index]
        label = np.asarray(label)
        strip = f"worst/{rank:02d}_{_safe_name(name)}.png"
        caption = f"{rank}. {name}: mIoU {100 * miou:.1f}, pixel accuracy {100 * acc:.1f}"
        plots.image_strip([np.asarray(image), _colour_labels(label, config.palette),
                           _colour_labels(prediction.astype(np.int64), config.palette), error_map(prediction, label)],
                          ["image", "ground truth", "prediction", "errors"], folder / strip, caption=caption)
        worst.append({"rank": rank, "name": name, "mIoU": 100 * miou, "pixel_acc": 100 * acc, "strip": strip})
    metrics = {
        "mIoU": result["mIoU"], "mAcc": result["mAcc"], "aAcc": result["aAcc"],
        "BF": _percent(boundary["BF"]), "mBF": _percent(boundary["mBF"]),
        "boundary_tolerance_px": collector.boundary.tolerance_px, "images": result["images"],
        "per_class": per_class,
        "worst_by": WORST_BY,
        "worst": worst,
        "per_image": [{"name": i["name"], "mIoU": _percent(i["mIoU"]), "pixel_acc": _percent(i["pixel_acc"])}
                      for i in collector.images],
        "evaluation": evaluation,
        "model": config.to_dict(),
        "regproxy": VERSION,
    }
    _write_text(folder / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    _write_confusion_csv(folder / "confusion_matrix.csv", confusion, classes)
    shown = plots.confusion_matrix(confusion, classes, folder / "confusion_matrix.png")
    plots.class_bars(result["IoU"], classes, folder / "per_class_iou.png", mean=result["mIoU"],
                     title="Per-class IoU, sorted")
    per_image = [i["mIoU"] * 100 for i in collector.images if not math.isnan(i["mIoU"])]
    plots.histogram(per_image, folder / "per_image_miou.png", bins=20, value_range=(0, 100),
                    title="Per-image mIoU", xlabel="mIoU (%)", ylabel="images")
    _write_text(folder / "report.html", _html(metrics, classes, len(shown)))


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _write_confusion_csv(path: Path, confusion: np.ndarray, classes: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ground truth \\ prediction", *classes])
        for name, row in zip(classes, confusion):
            writer.writerow([name, *(int(v) for v in row)])


def read_confusion_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(class names, counts) of a report's ``confusion_matrix.csv``."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0][1:], np.array([[int(v) for v in row[1:]] for row in rows[1:]], dtype=np.int64)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { padding: 2px 10px; text-align: right; border-bottom: 1px solid #eee; }
td:first-child, th:first-child { text-align: left; }
.summary td { font-size: 1.1em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #444; }
.key span { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: middle; margin: 0 0.2em 0 0.8em; }
.scroll { max-height: 600px; overflow-y: auto; display: inline-block; }
"""


def _html(metrics: dict, classes: list[str], shown: int) -> str:
    e = html.escape
    ev = metrics["evaluation"]
    model = metrics["model"]
    described = ", ".join(f"{k} {e(str(v))}" for k, v in ev.items() if v not in (None, False, ""))
    summary = "".join(
        f"<tr><td>{label}</td><td>{_fmt(metrics[key])}</td></tr>"
        for key, label in [("mIoU", "mIoU"), ("mAcc", "mAcc"), ("aAcc", "aAcc"),
                           ("BF", f"boundary F (all classes pooled, {metrics['boundary_tolerance_px']} px)"),
                           ("mBF", "boundary F, class mean")]
    )
    rows = "".join(
        f"<tr><td>{e(name)}</td><td>{_fmt(v['IoU'])}</td><td>{_fmt(v['Acc'])}</td><td>{_fmt(v['F1'])}</td>"
        f"<td>{_fmt(v['BF'])}</td><td>{v['gt_pixels']}</td></tr>"
        for name, v in metrics["per_class"].items()
    )
    if len(classes) > shown:
        matrix_note = (f"The {shown} of {len(classes)} classes with the most wrongly labelled pixels (as ground truth "
                       "or as prediction); rows are still fractions of each class's pixels. All counts are in the CSV.")
    else:
        matrix_note = "Rows are fractions of each ground-truth class's pixels (percent in the cells)."
    if metrics["worst"]:
        strips = "".join(
            f'<figure><img src="{quote(w["strip"])}" alt="{e(w["name"])}"><figcaption>{w["rank"]}. '
            f'{e(w["name"])}: mIoU {w["mIoU"]:.1f}, pixel accuracy {w["pixel_acc"]:.1f}</figcaption></figure>'
            for w in metrics["worst"]
        )
        worst = (f"<p>The {len(metrics['worst'])} images with the lowest {e(metrics['worst_by'])}. Errors: "
                 f'<span class="key"><span style="background:rgb{_RIGHT}"></span>right'
                 f'<span style="background:rgb{_WRONG}"></span>wrong'
                 f'<span style="background:rgb{_IGNORED}"></span>ignored</span> '
                 f"(ignored ground truth is black).</p>{strips}")
    else:
        worst = "<p>None kept (<code>--worst 0</code>).</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>regproxy evaluation report</title>
<style>{_STYLE}</style></head><body>
<h1>Evaluation report</h1>
<p>{e(model['backbone'])} ({len(classes)} classes), {metrics['images']} images; {described}.
Written by regproxy {e(metrics['regproxy'])} on {time.strftime('%Y-%m-%d %H:%M')}.</p>
<table class="summary">{summary}</table>
<p>Files: <a href="metrics.json">metrics.json</a> (everything on this page, and every image's score),
<a href="confusion_matrix.csv">confusion_matrix.csv</a> (pixel counts, rows ground truth, columns prediction).</p>
<h2>Per-class IoU</h2>
<img src="per_class_iou.png" alt="per-class IoU, sorted">
<h2>Confusion matrix</h2>
<p>{matrix_note}</p>
<img src="confusion_matrix.png" alt="confusion matrix">
<h2>Per-image mIoU</h2>
<img src="per_image_miou.png" alt="histogram of per-image mIoU">
<h2>Worst images</h2>
{worst}
<h2>Per-class scores (%)</h2>
<p>IoU and Acc as mmsegmentation; F1: pixel F1 (Dice), 2TP / (2TP + FP + FN); BF: boundary F-score within
{metrics['boundary_tolerance_px']} px; pixels: ground-truth pixels. "-": the class is absent.</p>
<div class="scroll"><table><tr><th>class</th><th>IoU</th><th>Acc</th><th>F1</th><th>BF</th><th>pixels</th></tr>
{rows}</table></div>
</body></html>
"""


# ---------------------------------------------------------------------------------------------------------------
# The FLOPs figure
# ---------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise RegproxyError(f"{path}: expected a JSON object")
    return data


def read_run(path: str | os.PathLike) -> dict:
    """Model config and mIoU of an evaluated run, for ``flops --plot --run DIR``.

    ``DIR`` may be an ``eval --report`` folder (or a run holding one in ``DIR/report``): its ``metrics.json`` has
    the mIoU and the model's config. Otherwise the model config is ``DIR/best/config.json`` (a training run),
    ``DIR/config.json`` (a model directory) or ``DIR/final/config.json``, and the mIoU is ``DIR/eval.json``
    (``regproxy eval --json > DIR/eval.json``) if present, else the config's own ``metrics.mIoU`` (the training
    run's validation at its best iteration).

    Returns:
        ``label`` (the folder name), ``config`` (ModelConfig), ``miou`` (percent) and ``source`` (the file read).
    """
    path = Path(path)
    if not path.is_dir():
        raise RegproxyError(f"--run {path}: no such folder")
    for report in (path, path / "report"):
        if (report / REPORT_MARKER).is_file() and (report / "metrics.json").is_file():
            metrics = _read_json(report / "metrics.json")
            config = ModelConfig.from_dict(metrics.get("model", {}), where=str(report / "metrics.json"))
            return {"label": path.name, "config": config, "miou": float(metrics["mIoU"]),
                    "source": str(report / "metrics.json")}
    config_path = next((p for p in (path / "best" / CONFIG_NAME, path / CONFIG_NAME, path / "final" / CONFIG_NAME)
                        if p.is_file()), None)
    if config_path is None:
        raise RegproxyError(f"--run {path}: found no eval report (metrics.json) and no model config "
                            f"(best/{CONFIG_NAME} or {CONFIG_NAME})")
    config = ModelConfig.from_dict(_read_json(config_path), where=str(config_path))
    if (path / "eval.json").is_file():
        evaluated = _read_json(path / "eval.json")
        if not isinstance(evaluated.get("mIoU"), (int, float)):
            raise RegproxyError(f"{path / 'eval.json'}: no mIoU (write it with `regproxy eval --json`)")
        return {"label": path.name, "config": config, "miou": float(evaluated["mIoU"]),
                "source": str(path / "eval.json")}
    if not isinstance(config.metrics.get("mIoU"), (int, float)):
        raise RegproxyError(f"--run {path}: {config_path} records no mIoU; evaluate it: "
                            f"regproxy eval --model {config_path.parent} --data ... --report {path / 'report'}")
    return {"label": path.name, "config": config, "miou": float(config.metrics["mIoU"]), "source": str(config_path)}


def _gflops(config: ModelConfig) -> float:
    count = count_flops(config.backbone, size=config.crop_size, classes=config.num_classes,
                        region_res=config.region_res, baseline=config.baseline)
    return count.paper_macs / 1e9


ZOO_GROUPS = {"vit": "RegProxy, ViT/16 (paper mIoU)", "hybrid": "RegProxy, hybrid (paper mIoU)"}
RUN_GROUP = "evaluated runs"


def flops_points(runs: list[str | os.PathLike], zoo: str | None = "ade20k") -> list[dict]:
    """Points of the mIoU-GFLOPs figure: the zoo's models of one dataset (``zoo``: ade20k, cityscapes or None)
    with the paper's single-scale mIoU, and the given runs (see :func:`read_run`).

    GFLOPs are counted by :mod:`regproxy_cli.model.flops` (the paper's convention, one forward pass at the model's
    crop size; a hybrid's ResNet stem included).
    """
    points = []
    for name, entry in ZOO.items():
        if entry.dataset != zoo:
            continue
        config = entry.config()
        hybrid = entry.backbone.startswith("r")
        points.append({"label": name, "gflops": _gflops(config), "miou": entry.miou,
                       "group": ZOO_GROUPS["hybrid" if hybrid else "vit"], "source": "paper (single scale)"})
    for run in runs:
        found = read_run(run)
        points.append({"label": found["label"], "gflops": _gflops(found["config"]), "miou": found["miou"],
                       "group": RUN_GROUP, "source": found["source"]})
    return points


def plot_flops(points: list[dict], path: str | os.PathLike, *, log_x: bool = False) -> Path:
    """Draw :func:`flops_points` (the ViT/16 zoo models joined by a line, as the paper draws its family)."""
    return plots.flops_scatter(points, path, log_x=log_x, lines=[ZOO_GROUPS["vit"]],
                               title="mIoU against GFLOPs (cf. the paper's Fig. 2)")

