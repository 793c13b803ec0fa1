"""What the benchmarks share: the machine's description, interleaved timing, memory, matmul rate and the studies'
scores (through :func:`regproxy_cli.engine.evaluate.evaluate`, so a study's mIoU is ``regproxy eval``'s).

Timing protocol: every contender runs in the same process, one call each per round, in a rotating order, so that
slow drifts of the machine (turbo, other load) hit all of them alike; a contender's figure is the median of its
rounds. Ratios between contenders measured in one such run are the numbers to trust; absolute times depend on
the machine and on what else runs on it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from regproxy_cli.data.streets import object_recall, read_sidecar, recall_by_width
from regproxy_cli.engine.evaluate import evaluate
from regproxy_cli.engine.report import ReportCollector
from regproxy_cli.inference.runtime import synchronize
from regproxy_cli.model.attention import cpu_info

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TOLERANCE_PX = 2  # the boundary F-score's matching distance in every study
OBJECT_KINDS = ("pole", "sign")  # streets objects whose recall by width is reported


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (results JSON is committed), else as given."""
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def machine() -> dict:
    """CPU model, cores, threads and library versions, for the report's header."""
    cpu, flags = cpu_info()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("timm", "transformers", "onnxruntime"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return {
        "cpu": cpu, "isa": isa, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "versions": versions,
    }


def interleaved(
    contenders: dict[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each contender, timed round-robin in a rotating order.

    Args:
        contenders: name -> a call to time (it must do the whole job, e.g. image batch -> label maps).
        rounds: timed calls per contender (fewer if ``budget_s`` runs out first, but at least 2).
        warmup: untimed calls per contender first (allocator, oneDNN kernels, lazy init).
        device: synchronised around each call when it is a GPU.
        budget_s: stop after the round in which the total time passed this.

    Returns:
        name -> the list of measured seconds.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            begin = time.perf_counter()
            contenders[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - begin)
        if budget_s is not None and round_index >= 1 and time.perf_counter() - started > budget_s:
            break
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def matmul_gflops(size: int = 2048, repeats: int = 9, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> float:
    """This machine's dense matmul rate (GFLOP/s, 2 n^3 per product), median of ``repeats`` square products."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        begin = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return 2 * size**3 / median(times) / 1e9


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (VmHWM), in MiB.

    Not ``getrusage``'s ru_maxrss: Linux keeps that across ``execve``, so a child started by a big parent
    would report the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_mb() -> float:
    """Current resident set size of this process, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class StudyScores(ReportCollector):
    """What :func:`regproxy_cli.engine.evaluate.evaluate` hands a report, kept for a study: the boundary counts and,
    with ``sidecars`` (a streets ``instances/{split}`` folder), every pole's and sign's recall."""

    def __init__(self, num_classes: int, sidecars: Path | None = None, tolerance_px: int = TOLERANCE_PX) -> None:
        super().__init__(num_classes, worst=0, tolerance_px=tolerance_px)
        self.sidecars = sidecars
        self.objects: list[dict] = []

    def add(self, index: int, name: str, prediction: np.ndarray, label: np.ndarray) -> None:
        super().add(index, name, prediction, label)
        if self.sidecars is not None:
            self.objects += object_recall(prediction, read_sidecar(self.sidecars / f"{name}.json"))


def score(model: torch.nn.Module, dataset, *, sidecars: Path | None = None, levels: bool = False) -> dict:
    """A study's scores of ``model`` on ``dataset`` (percent, 2 decimals), from one :func:`evaluate` pass (``regproxy
    eval``'s mIoU, the model's own protocol): mIoU, aAcc, per-class IoU and the boundary F-score (2 px).

    Args:
        sidecars: a streets ``instances/{split}`` folder: also the per-object recall of poles and signs by width.
        levels: also a hierarchical model's mIoU at each coarser label level, as ``{level}_mIoU``.
    """
    collected = StudyScores(model.config.num_classes, sidecars)
    result = evaluate(model, dataset, progress=False, report=collected)
    bf = collected.boundary.compute()
    scores = {"mIoU": round(result["mIoU"], 2), "aAcc": round(result["aAcc"], 2), "IoU": _rounded(result["IoU"]),
              "BF": round(100 * bf["BF"], 2), "mBF": round(100 * bf["mBF"], 2),
              "boundary_precision": round(100 * bf["precision"], 2), "boundary_recall": round(100 * bf["recall"], 2),
              "BF_per_class": _rounded([None if np.isnan(v) else 100 * float(v) for v in bf["F"]])}
    if sidecars is not None:
        objects = collected.objects
        scores["object_recall"] = {kind: recall_by_width([o for o in objects if o["kind"] == kind])
                                   for kind in OBJECT_KINDS}
        scores["object_recall"]["pole+sign"] = recall_by_width([o for o in objects if o["kind"] in OBJECT_KINDS])
    if levels:
        scores |= {f"{level}_mIoU": round(each["mIoU"], 2) for level, each in result.get("levels", {}).items()}
    return scores


def _rounded(values: list[float | None]) -> list[float | None]:
    return [None if v is None else round(v, 2) for v in values]


def run_json(args: list[str], timeout: float = 1800, env: dict[str, str] | None = None) -> dict:
    """Run a bench script in a fresh Python process (for clean peak-memory readings, or ``env`` read at import,
    such as ``ONEDNN_MAX_CPU_ISA``) and parse its JSON line."""
    result = subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, timeout=timeout,
                            cwd=REPO, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
