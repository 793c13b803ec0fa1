"""Region entropy (the paper's Sec. 5.4 and Fig. 6, left): how semantically pure the learned regions are.

A region's class histogram is Eq. 1 of the paper: the count of its pixels of each class; its entropy (natural log)
says how mixed the region is, 0 for a region inside one object. Three kinds of region are measured:

* ``learned``: each pixel in the region of the token it has the highest affinity with (Eq. 4; the regions
  ``predict --regions`` draws);
* ``soft``: the probabilistic regions themselves, pixel p counting A(p, t) towards token t, so a region always
  holds a little of its neighbours' classes and is rarely exactly pure;
* ``cells``: the regular cells a conventional model classifies, each token's own ``stride x stride`` square.

The paper compares learned regions with regular cells (and SLIC superpixels, left out here: they would need a
superpixel library) over a whole validation split, and plots the distribution of the non-zero entropies.

Labels are taken at the model's output grid (``stride / h`` pixels per cell): each grid cell carries the class
fractions of the ground-truth pixels under it, so thin objects count with their area, not by a nearest sample.
Ignored pixels count for nothing; a region with (almost) no labelled mass is left out.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from regproxy_cli import plots
from regproxy_cli.constants import IGNORE_INDEX
from regproxy_cli.data.datasets import SegmentationDataset
from regproxy_cli.errors import RegproxyError
from regproxy_cli.files import write_text_atomic
from regproxy_cli.inference.predictor import device_of, normalise
from regproxy_cli.inference.protocol import TestProtocol
from regproxy_cli.inference.runtime import autocast

MIN_MASS = 1e-3  # of a region's labelled weight, in grid cells: below it the region has no labelled pixels
SOURCES = ("learned", "soft", "cells")


def cell_class_fractions(labels: np.ndarray, frame: tuple[int, int], grid: tuple[int, int], num_classes: int
                         ) -> torch.Tensor:
    """(K, Gh, Gw) fractions of each class among the pixels under each output-grid cell.

    ``labels`` (H, W) are padded bottom/right with the ignore label to ``frame`` (the padded size the model saw),
    which divides evenly into ``grid``. Ignored pixels add to no class, so a cell's fractions sum to its labelled
    share."""
    height, width = labels.shape
    padded = np.full(frame, IGNORE_INDEX, dtype=np.int64)
    padded[:height, :width] = labels
    cell_h, cell_w = frame[0] // grid[0], frame[1] // grid[1]
    tensor = torch.from_numpy(padded)
    labelled = tensor != IGNORE_INDEX
    onehot = F.one_hot(torch.where(labelled, tensor, 0), num_classes).permute(2, 0, 1).float() * labelled
    return F.avg_pool2d(onehot[None], (cell_h, cell_w))[0]


def region_histograms(affinity: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """(K, Hg, Wg) class histograms of the learned regions: ``sum_p A(p, t) * fractions(p)``.

    ``affinity`` is (9, h, w, Hg, Wg) (the model's, for one image; neighbour n = (dy+1)*3 + (dx+1) of the token
    whose sub-pixel it is), ``fractions`` (K, Hg*h, Wg*w) from :func:`cell_class_fractions`."""
    _, sub_h, sub_w, grid_h, grid_w = affinity.shape
    classes = fractions.shape[0]
    cells = fractions.reshape(classes, grid_h, sub_h, grid_w, sub_w)
    # contribution[n, k, y, x]: what the sub-pixels of token (y, x) give to their neighbour n
    contribution = torch.einsum("nijyx,kyixj->nkyx", affinity.float(), cells)
    padded = torch.zeros(classes, grid_h + 2, grid_w + 2)
    for n in range(9):
        dy, dx = n // 3 - 1, n % 3 - 1
        # the sub-pixels of token (y, x) go to token (y + dy, x + dx); out-of-grid ones carry zero affinity
        padded[:, 1 + dy: 1 + dy + grid_h, 1 + dx: 1 + dx + grid_w] += contribution[n]
    return padded[:, 1:-1, 1:-1]


def cell_histograms(fractions: torch.Tensor, sub: tuple[int, int]) -> torch.Tensor:
    """(K, Hg, Wg) class histograms of the regular cells: each token's own square, hard."""
    classes, rows, cols = fractions.shape
    return fractions.reshape(classes, rows // sub[0], sub[0], cols // sub[1], sub[1]).sum(dim=(2, 4))


def entropies(histograms: torch.Tensor) -> np.ndarray:
    """The entropy (nats) of each region's normalised class histogram; regions without labelled mass dropped."""
    flat = histograms.reshape(histograms.shape[0], -1).T  # (regions, K)
    mass = flat.sum(1)
    flat = flat[mass > MIN_MASS]
    p = flat / flat.sum(1, keepdim=True)
    return (-(p * torch.log(p.clamp(min=1e-12))).sum(1)).clamp(min=0).numpy()


@dataclass
class RegionEntropy:
    """Entropies of every region over a dataset, per source (``learned``, ``soft``, ``cells``)."""

    values: dict[str, np.ndarray]
    classes: int
    images: int

    def summary(self) -> dict:
        out = {"images": self.images, "classes": self.classes, "max_entropy": math.log(self.classes)}
        for source, values in self.values.items():
            nonzero = values[values > 1e-6]
            out[source] = {
                "regions": int(values.size), "pure_share": round(float((values <= 1e-6).mean()), 4) if values.size else None,
                "mean": round(float(values.mean()), 4) if values.size else None,
                "mean_nonzero": round(float(nonzero.mean()), 4) if nonzero.size else None,
                "median_nonzero": round(float(np.median(nonzero)), 4) if nonzero.size else None,
            }
        return out


@torch.no_grad()
def region_entropy(model: nn.Module, dataset: SegmentationDataset, *, limit: int | None = None,
                   progress: bool = True, precision: str = "fp32") -> RegionEntropy:
    """Region entropies of ``model``'s learned regions and of the regular cells over ``dataset``.

    Each image is seen whole at the model's test scale (as ``predict --regions``), the network at ``precision``
    (fp32, or bf16 / fp16 autocast); its labels are resized to that size (nearest) before they are counted."""
    if not model.has_regions:
        raise RegproxyError("analyze regions needs a RegProxy model; the linear baseline has no regions")
    config = model.config
    if dataset.num_classes != config.num_classes:
        raise RegproxyError(f"the model has {config.num_classes} classes, the dataset {dataset.num_classes}")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise RegproxyError("analyze regions: the dataset has no images")
    model.eval()
    found: dict[str, list[np.ndarray]] = {source: [] for source in SOURCES}
    for index in tqdm(range(count), desc="regions", unit="image", disable=not progress):
        image, labels, _ = dataset[index]
        size = TestProtocol.from_config(config).working_size(*image.shape[:2])
        x = normalise(image, config, device_of(model))
        if size != tuple(image.shape[:2]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            labels = np.asarray(F.interpolate(torch.from_numpy(np.asarray(labels))[None, None].float(), size=size,
                                              mode="nearest")[0, 0].long())
        with autocast(x.device, precision):
            affinity = model.forward_all(x).affinity[0].float().cpu()  # (9, h, w, Hg, Wg)
        _, sub_h, sub_w, grid_h, grid_w = affinity.shape
        stride = model.backbone.stride
        fractions = cell_class_fractions(np.asarray(labels), (grid_h * stride, grid_w * stride),
                                         (grid_h * sub_h, grid_w * sub_w), config.num_classes)
        owner = F.one_hot(affinity.argmax(0), 9).permute(4, 0, 1, 2, 3).float()  # hard: the arg-max token
        found["learned"].append(entropies(region_histograms(owner, fractions)))
        found["soft"].append(entropies(region_histograms(affinity, fractions)))
        found["cells"].append(entropies(cell_histograms(fractions, (sub_h, sub_w))))
    return RegionEntropy({s: np.concatenate(v) for s, v in found.items()}, config.num_classes, count)


def write_region_entropy(result: RegionEntropy, out_dir: str | os.PathLike, title: str = "") -> list[Path]:
    """``region_entropy.json`` (the summary) and ``region_entropy.png`` (the distributions of the non-zero
    entropies, learned regions against regular cells, as Fig. 6)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    json_path = out / "region_entropy.json"
    write_text_atomic(json_path, json.dumps(summary, indent=2) + "\n")
    nonzero = {s: v[v > 1e-6] for s, v in result.values.items()}
    labels = {"learned": "learned regions (arg-max token)", "soft": "learned regions, soft (affinity-weighted)",
              "cells": "regular cells (one token's square)"}
    png = plots.distributions({labels[s]: nonzero[s] for s in SOURCES}, out / "region_entropy.png",
                              value_range=(0.0, summary["max_entropy"]), xlabel="region entropy (nats), zeros left out",
                              title=title or f"Region entropy over {result.images} images")
    return [json_path, png]
