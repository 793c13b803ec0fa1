"""Every matplotlib figure the package draws: confusion matrix, per-class IoU bars, image strips, the FLOPs scatter
(the paper's Fig. 2), a generic histogram and density curves (Fig. 6).

A leaf module: it takes numpy arrays and plain Python values, depends on numpy and matplotlib only (plus the
package's error type), and knows nothing about models or datasets. matplotlib is an optional dependency
(``pip install 'regproxy[report]'``); it is imported when a figure is drawn, never at package import. Figures are
drawn with the Agg canvas directly (no pyplot, no global backend switch, nothing left open) and written atomically
as PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from regproxy_cli.errors import require_extra
from regproxy_cli.files import write_atomic

CONFUSION_MAX_CLASSES = 30  # above this many classes the heat-map shows the most confused ones only
DPI = 100


def require_matplotlib(what: str = "plots") -> None:
    """Raise one clear line when matplotlib is missing, before any long computation starts."""
    require_extra("matplotlib", "report", what)


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot: nothing global, nothing to close), for :func:`save_figure`."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG at ``path``, atomically; returns the path."""
    path = Path(path)
    # format= because the temporary file's suffix is .tmp, not .png
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    return path


def confused_classes(matrix: np.ndarray, limit: int = CONFUSION_MAX_CLASSES) -> np.ndarray:
    """Ids of the ``limit`` classes with the most wrongly labelled pixels (as ground truth or as prediction),
    in id order; every class when there are no more than ``limit``."""
    matrix = np.asarray(matrix, dtype=np.float64)
    k = matrix.shape[0]
    if k <= limit:
        return np.arange(k)
    errors = matrix.sum(axis=0) + matrix.sum(axis=1) - 2 * np.diag(matrix)
    # stable on ties: fewer errors, then higher id, is left out first
    order = np.lexsort((np.arange(k), -errors))
    return np.sort(order[:limit])


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the fraction of a ground-truth class's pixels given each label); 0 rows stay 0."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: str | os.PathLike, *,
                     max_classes: int = CONFUSION_MAX_CLASSES, title: str = "Confusion matrix") -> list[int]:
    """Heat-map of the row-normalised confusion matrix (rows: ground truth, columns: prediction).

    With more than ``max_classes`` classes (ADE20K's 150 would be unreadable) only the ``max_classes`` classes with
    the most wrongly labelled pixels are shown; their rows are still normalised by the class's full pixel count, so
    a cell reads the same as in the full matrix. The figure grows with the number of classes shown and cells carry
    their percentage up to 20 classes.

    Returns:
        the class ids shown, in order.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(classes):
        raise ValueError(f"confusion matrix {matrix.shape} does not match {len(classes)} classes")
    shown = confused_classes(matrix, max_classes)
    values = row_normalised(matrix)[np.ix_(shown, shown)]
    names = [classes[i] for i in shown]
    n = len(shown)
    side = max(5.0, 0.32 * n + 2.5)
    figure = new_figure(side + 1.2, side)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the ground-truth class's pixels")
    axes.set_xticks(range(n), names, rotation=90, fontsize=8 if n > 20 else 10)
    axes.set_yticks(range(n), names, fontsize=8 if n > 20 else 10)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth")
    if n < len(classes):
        title += f"\n{n} of {len(classes)} classes: those with the most wrongly labelled pixels"
    axes.set_title(title)
    if n <= 20:
        for row in range(n):
            for col in range(n):
                if values[row, col] >= 0.005:
                    axes.text(col, row, f"{100 * values[row, col]:.0f}", ha="center", va="center", fontsize=8,
                              color="white" if values[row, col] > 0.5 else "black")
    save_figure(figure, path)
    return shown.tolist()


def class_bars(values: Sequence[float | None], classes: Sequence[str], path: str | os.PathLike, *,
               xlabel: str = "IoU (%)", title: str = "Per-class IoU", mean: float | None = None) -> list[int]:
    """Horizontal bars of a per-class score, sorted best first; classes with no value (``None``/NaN) are left out
    and counted in the title. The figure is 0.2 inch per class tall, so 150 classes stay legible.

    Returns:
        the class ids drawn, top to bottom.
    """
    scores = np.array([np.nan if v is None else float(v) for v in values])
    if len(scores) != len(classes):
        raise ValueError(f"{len(scores)} values for {len(classes)} classes")
    drawn = [int(i) for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable") if not np.isnan(scores[i])]
    absent = len(classes) - len(drawn)
    figure = new_figure(8.0, max(2.5, 0.2 * len(drawn) + 1.5))
    axes = figure.add_subplot()
    positions = np.arange(len(drawn))
    axes.barh(positions, scores[drawn], color="#4c72b0", height=0.75)
    axes.set_yticks(positions, [classes[i] for i in drawn], fontsize=8)
    axes.set_ylim(len(drawn) - 0.5, -0.5)  # best on top
    axes.set_xlim(0, 100)
    axes.set_xlabel(xlabel)
    axes.xaxis.set_ticks_position("both")
    axes.tick_params(axis="x", labeltop=True)
    if mean is not None:
        axes.axvline(mean, color="#c44e52", linestyle="--", linewidth=1, label=f"mean {mean:.2f}")
        axes.legend(loc="lower right")
    for position, index in zip(positions, drawn):
        axes.text(scores[index] + 0.5, position, f"{scores[index]:.1f}", va="center", fontsize=7)
    axes.set_title(title + (f" ({absent} classes absent from ground truth and prediction)" if absent else ""))
    save_figure(figure, path)
    return drawn


def image_strip(panels: Sequence[np.ndarray], titles: Sequence[str], path: str | os.PathLike, *,
                caption: str = "", panel_width: float = 3.2) -> Path:
    """Pictures side by side (each (H, W, 3) uint8, same size), a title over each and a caption above them all.

    Label maps are drawn pixel for pixel (nearest neighbour), whatever the image's size.
    """
    if len(panels) != len(titles) or not panels:
        raise ValueError("one title per panel, at least one panel")
    height, width = np.asarray(panels[0]).shape[:2]
    panel_height = panel_width * height / width
    figure = new_figure(panel_width * len(panels), panel_height + (0.7 if caption else 0.35))
    for slot, (panel, title) in enumerate(zip(panels, titles), start=1):
        axes = figure.add_subplot(1, len(panels), slot)
        axes.imshow(np.asarray(panel), interpolation="nearest")
        axes.set_title(title, fontsize=10)
        axes.set_axis_off()
    if caption:
        figure.suptitle(caption, fontsize=10)
    save_figure(figure, path)
    return Path(path)


def histogram(values: Sequence[float] | np.ndarray, path: str | os.PathLike, *, bins: int | Sequence[float] = 30,
              value_range: tuple[float, float] | None = None, title: str = "", xlabel: str = "",
              ylabel: str = "count", log_y: bool = False, weights: Sequence[float] | np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """A bar histogram of ``values`` (NaNs dropped) written as a PNG.

    Args:
        values: the numbers to count.
        path: the PNG to write.
        bins: a bin count or the bin edges, as numpy.histogram takes them.
        value_range: (low, high) of the bins; default: the data's range.
        title, xlabel, ylabel: the texts of the figure.
        log_y: logarithmic counts (for long-tailed data such as region sizes).
        weights: one weight per value (e.g. pixels per region), instead of counting each value once.

    Returns:
        (counts, bin edges) as numpy.histogram computes them, so callers can report or test them.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    keep = ~np.isnan(values)
    weights_kept = None if weights is None else np.asarray(weights, dtype=np.float64).ravel()[keep]
    counts, edges = np.histogram(values[keep], bins=bins, range=value_range, weights=weights_kept)
    figure = new_figure(6.4, 4.0)
    axes = figure.add_subplot()
    axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white",
             linewidth=0.5)
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    save_figure(figure, path)
    return counts, edges


def kde(values: np.ndarray, grid: np.ndarray, max_samples: int = 20000) -> np.ndarray:
    """A Gaussian kernel density estimate of ``values`` on ``grid`` (Scott's bandwidth); at most ``max_samples``
    values, evenly picked, enter the sum."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size > max_samples:
        values = values[np.linspace(0, values.size - 1, max_samples).round().astype(int)]
    spread = values.std()
    if values.size < 2 or spread == 0:
        return np.zeros_like(grid, dtype=np.float64)
    bandwidth = spread * values.size ** (-1 / 5)
    z = (np.asarray(grid, dtype=np.float64)[:, None] - values[None, :]) / bandwidth
    return np.exp(-0.5 * z**2).sum(1) / (values.size * bandwidth * np.sqrt(2 * np.pi))


def distributions(series: dict[str, np.ndarray], path: str | os.PathLike, *, value_range: tuple[float, float],
                  title: str = "", xlabel: str = "") -> Path:
    """Density curves (Gaussian KDE, as the paper's Fig. 6) of several samples on one axis, with their counts and
    means in the legend."""
    figure = new_figure(6.4, 4.0)
    axes = figure.add_subplot()
    grid = np.linspace(value_range[0], value_range[1], 256)
    for (name, values), colour in zip(series.items(), ("#c44e52", "#4c72b0", "#55a868", "#8172b2")):
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            axes.plot([], [], color=colour, label=f"{name}: no values")
            continue
        density = kde(values, grid)
        axes.plot(grid, density, color=colour, linewidth=2,
                  label=f"{name}: n = {values.size:,}, mean {values.mean():.3f}")
        axes.fill_between(grid, density, color=colour, alpha=0.15)
    axes.set_xlim(*value_range)
    axes.set_ylim(bottom=0)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("density")
    axes.set_title(title)
    axes.legend(loc="upper right", fontsize=8)
    return save_figure(figure, path)


def flops_scatter(points: Sequence[dict], path: str | os.PathLike, *, log_x: bool = False,
                  lines: Sequence[str] = (), title: str = "mIoU against GFLOPs") -> Path:
    """mIoU (y) against GFLOPs (x), one labelled point per model, as the paper's Fig. 2.

    Args:
        points: dicts with ``label``, ``gflops``, ``miou`` and ``group`` (the legend entry; points of one group
            share a colour and a marker).
        log_x: logarithmic GFLOPs axis (the zoo spans 4 to 330 GFLOPs).
        lines: groups whose points are joined by a line in GFLOPs order, as the paper joins a model family.
    """
    if not points:
        raise ValueError("nothing to plot")
    figure = new_figure(7.5, 5.0)
    axes = figure.add_subplot()
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    groups = list(dict.fromkeys(p["group"] for p in points))
    for slot, group in enumerate(groups):
        members = sorted((p for p in points if p["group"] == group), key=lambda p: p["gflops"])
        xs = [p["gflops"] for p in members]
        ys = [p["miou"] for p in members]
        axes.plot(xs, ys, linestyle="-" if group in lines else "none", marker=markers[slot % len(markers)],
                  markersize=7, label=group, color=f"C{slot}")
    if log_x:
        axes.set_xscale("log")
    axes.set_xlabel("GFLOPs (multiply-adds, one forward pass at the model's crop size; the paper's convention)")
    axes.set_ylabel("mIoU (%)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
    axes.legend(loc="lower right", fontsize=8)
    _label_points(axes, [(p["gflops"], p["miou"], p["label"]) for p in points])
    save_figure(figure, path)
    return Path(path)


def _label_points(axes: Any, points: Sequence[tuple[float, float, str]], fontsize: float = 8) -> None:
    """Label each point beside it, on the first side where the label overlaps no earlier label and no point
    (close models such as S/16 and R26+S/32 would otherwise print over each other)."""
    axes.figure.canvas.draw()  # fixes the limits, so data -> pixel positions are final
    scale = DPI / 72  # points to pixels
    anchors = axes.transData.transform([(x, y) for x, y, _ in points])
    height = fontsize * scale * 1.2
    taken: list[tuple[float, float, float, float]] = [(ax - 4 * scale, ay - 4 * scale, ax + 4 * scale, ay + 4 * scale)
                                                      for ax, ay in anchors]  # the markers
    for (x, y, label), (ax, ay) in zip(points, anchors):
        width = 0.62 * fontsize * scale * len(label)
        options = [(5, 4, "left"), (5, -4 - height / scale, "left"), (-5, 4, "right"),
                   (-5, -4 - height / scale, "right"), (5, 12, "left"), (5, -12 - height / scale, "left")]
        for dx, dy, align in options:
            left = ax + dx * scale - (width if align == "right" else 0)
            box = (left, ay + dy * scale, left + width, ay + dy * scale + height)
            if not any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken):
                break
        taken.append(box)
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), ha=align, va="bottom",
                      fontsize=fontsize)
