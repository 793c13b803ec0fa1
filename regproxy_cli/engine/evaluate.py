"""Evaluation with the paper's metric: mIoU / mAcc / aAcc over a whole dataset, as mmsegmentation computes them."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from regproxy_cli.constants import IGNORE_INDEX
from regproxy_cli.data.datasets import SegmentationDataset
from regproxy_cli.data.open import open_dataset
from regproxy_cli.engine.config import load_config
from regproxy_cli.engine.distributed import barrier, rank_world
from regproxy_cli.engine.metrics import ConfusionMatrix
from regproxy_cli.engine.report import ReportCollector
from regproxy_cli.errors import RegproxyError
from regproxy_cli.images import save_label_png
from regproxy_cli.inference.predictor import predict_labels
from regproxy_cli.model.classifiers import label_levels
from regproxy_cli.onnx.export import CalibrationSet, label_agreement
from regproxy_cli.onnx.runtime import load_onnx_model


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset,
    *,
    mode: str | None = None,
    tta: bool = False,
    batch_size: int = 8,
    precision: str = "fp32",
    save_dir: Path | None = None,
    progress: bool = True,
    report: ReportCollector | None = None,
) -> dict:
    """mIoU, mAcc, aAcc (percent) and per-class IoU/Acc of ``model`` on ``dataset``, DDP-aware.

    Each process segments every world_size-th image with the model's own protocol (test scale, whole or
    sliding window, optional multi-scale + flip); intersections and unions are summed over the whole dataset
    per class and across processes, and classes absent from both prediction and ground truth are left out.
    ``report`` (for ``eval --report``) also gets every image's prediction, for boundary F-scores, per-image scores
    and the worst images; it is gathered across processes at the end.
    """
    config = model.config
    if dataset.num_classes != config.num_classes:
        raise RegproxyError(f"the model predicts {config.num_classes} classes but the dataset has {dataset.num_classes}")
    rank, world = rank_world()
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(config.num_classes)
    # coarser levels (HSSN's categories): predictions and labels both mapped through the class tree
    levels = {name: (classes, torch.cat([to_level.cpu(), torch.tensor([IGNORE_INDEX])]), ConfusionMatrix(len(classes)))
              for name, (classes, to_level) in label_levels(model).items()}
    indices = range(rank, len(dataset), world)
    palette = np.array(config.palette, dtype=np.uint8)
    loaded = prefetched(dataset, indices)
    for index, (image, label, name) in tqdm(loaded, desc="evaluating", unit="image", total=len(indices),
                                            disable=not progress or rank != 0, leave=False):
        prediction = predict_labels(model, image, mode=mode, tta=tta, batch_size=batch_size, precision=precision)
        predicted, truth = torch.from_numpy(prediction), torch.from_numpy(np.asarray(label, dtype=np.int64))
        matrix.update(predicted, truth)
        for _, lookup, level_matrix in levels.values():  # the ignore label maps to itself (the lookup's last entry)
            level_matrix.update(lookup[predicted.long()], lookup[torch.where(truth == IGNORE_INDEX, -1, truth)])
        if report is not None:
            report.add(index, name, prediction, label)
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            save_label_png(save_dir / f"{Path(name).stem}.png", prediction, palette)
    matrix.all_reduce()
    for _, _, level_matrix in levels.values():
        level_matrix.all_reduce()
    if report is not None:
        report.gather(matrix)
    model.train(was_training)
    result = matrix.compute()
    return {
        "mIoU": 100 * result["mIoU"],
        "mAcc": 100 * result["mAcc"],
        "aAcc": 100 * result["aAcc"],
        "IoU": [None if np.isnan(v) else 100 * float(v) for v in result["IoU"]],
        "Acc": [None if np.isnan(v) else 100 * float(v) for v in result["Acc"]],
        "images": len(dataset),
        **({"levels": {name: _level_result(classes, level_matrix.compute())
                       for name, (classes, _, level_matrix) in levels.items()}} if levels else {}),
    }


def prefetched(dataset, indices: Sequence[int], ahead: int = 2) -> Iterator[tuple[int, tuple]]:
    """(index, ``dataset[index]``) for each index, read and decoded on a worker thread up to ``ahead`` images ahead,
    while the caller runs the network (Pillow decodes without the GIL), so the GPU does not wait for the decoder."""
    with ThreadPoolExecutor(1, thread_name_prefix="regproxy-eval-read") as reader:
        todo = iter(indices)
        pending = deque((index, reader.submit(dataset.__getitem__, index)) for index in islice(todo, ahead))
        try:
            while pending:
                index, future = pending.popleft()
                following = next(todo, None)
                if following is not None:
                    pending.append((following, reader.submit(dataset.__getitem__, following)))
                yield index, future.result()
        finally:  # stopped early (an error in the caller): no more reads
            for _, future in pending:
                future.cancel()


def _level_result(classes: list[str], result: dict) -> dict:
    return {"classes": list(classes), "mIoU": 100 * result["mIoU"],
            "IoU": [None if np.isnan(v) else 100 * float(v) for v in result["IoU"]]}


def open_eval_dataset(data: str, split: str | None = None) -> SegmentationDataset:
    """``--data``: a training config (its data section) or a dataset folder (format detected).

    Under torchrun the main process opens it first, so synthetic scenes are generated once, not by every process.
    """
    rank, _ = rank_world()
    dataset = _open_eval_dataset(data, split) if rank == 0 else None
    barrier()
    return dataset if dataset is not None else _open_eval_dataset(data, split)


def _open_eval_dataset(data: str, split: str | None) -> SegmentationDataset:
    path = Path(data)
    if path.suffix in (".yaml", ".yml"):
        section = load_config(path).data
        return section.open(split or section.val_split)
    if not path.is_dir():
        raise RegproxyError(f"--data {data}: not a config file or a dataset folder")
    return open_dataset("auto", path, split or "val")


def compare_onnx_models(reference: Path, candidate: Path, samples: CalibrationSet) -> tuple[float, list[float] | None]:
    """(% of pixels whose label ``candidate`` shares with ``reference``, both files' mIoU or None) on ``samples``
    (export --quantize: the int8 file against the fp32 one on the calibration images)."""
    first, second = load_onnx_model(reference), load_onnx_model(candidate)
    agreement = label_agreement(first, second, samples.images())
    scores = [evaluate(m, samples, progress=False)["mIoU"] for m in (first, second)] if samples.labelled else None
    return agreement, scores
