"""Timing a model's image -> label map step (``Segmenter.labels``, whole mode) on this machine."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from regproxy_cli.errors import RegproxyError
from regproxy_cli.inference.predictor import device_of
from regproxy_cli.inference.quantize import check_int8_model
from regproxy_cli.inference.runtime import autocast, synchronize
from regproxy_cli.model.attention import cpu_info


@dataclass
class BenchmarkResult:
    """What :func:`benchmark_labels` measured. ``times_ms`` holds every timed call (one batch each)."""

    backbone: str
    size: tuple[int, int]
    batch: int
    precision: str
    device: str
    device_name: str
    torch_version: str
    threads: int
    warmup: int
    iters: int
    total_s: float
    images_per_s: float
    ms_per_image_median: float
    ms_per_image_min: float
    ms_per_image_max: float
    times_ms: list[float]
    max_memory_allocated: int | None  # bytes, CUDA only
    attention: str | None  # the attention kernel the backbone ran: sdpa or explicit (measured on CPU bf16)
    fast_path: tuple[str, str] | None = None  # CPU: (precision, why) of the fastest measured path on this CPU kind

    def as_dict(self) -> dict:
        return asdict(self)


# The fastest CPU path for RegProxy-S/16 at 512^2 per kind of CPU, as measured (docs/benchmarks.md, sections int8
# and fastpath; CPUs without AMX emulated with ONEDNN_MAX_CPU_ISA where no such machine was at hand). --precision
# stays fp32 unless asked: fp32 gives the published mIoU and the same labels everywhere; the others change a few
# pixels in a thousand (bf16) or a few in a hundred (int8) on a trained model.
CPU_PATHS: tuple[tuple[str, str, str], ...] = (
    ("amx_bf16", "bf16", "AMX runs bf16 products on its tiles: bf16 measured 2-3x fp32 here, int8 1.1-1.6x"),
    ("avx512_bf16", "int8", ("AVX512-BF16 without AMX: int8 on VNNI measured 1.7x fp32, bf16 1.0x, with oneDNN "
                             "held to AVX512-BF16 on an AMX Xeon (an emulation)")),
    ("avx512_vnni", "int8", ("AVX512-VNNI without BF16: int8 products on VNNI, 1.0-1.5x fp32 measured with oneDNN "
                             "held to AVX512-VNNI (an emulation)")),
    ("avx2", "int8", ("AVX2 without AVX-512: int8 through oneDNN's AVX2 kernels measured 1.2x fp32 on an AMD EPYC; "
                      "bf16 has no instructions here and ran 7.5x slower than fp32")),
)


def cpu_fast_path(flags: frozenset[str] | None = None) -> tuple[str, str]:
    """(precision, why) of the fastest measured path on a CPU with ``flags`` (default: this CPU's); fp32 when the
    CPU has none of AMX, AVX512-BF16, AVX512-VNNI or AVX2. ``ONEDNN_MAX_CPU_ISA`` capping oneDNN below a flag the
    CPU has is not seen here (it changes which of oneDNN's kernels run, not the flags)."""
    flags = cpu_info()[1] if flags is None else flags
    for flag, precision, why in CPU_PATHS:
        if flag in flags:
            return precision, why
    return "fp32", "no AMX, AVX-512 or AVX2: int8 and bf16 were not measured on such a CPU; fp32 is the safe path"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_info()[0] or device.type


@torch.inference_mode()
def benchmark_labels(
    model: nn.Module,
    *,
    size: tuple[int, int] | None = None,
    batch: int = 1,
    iters: int = 20,
    warmup: int = 3,
    precision: str = "fp32",
    seed: int = 0,
) -> BenchmarkResult:
    """Time ``model.labels`` on a random normalised (batch, 3, H, W) input on the model's device.

    ``warmup`` untimed calls first (allocator, kernels, lazy init), then ``iters`` timed calls, each followed by a
    device synchronisation on CUDA, so a call's time is the whole batch's work. images/s is ``iters * batch`` over
    the total of the timed calls; ms/image is a call's time over ``batch`` (median, min, max over the calls).

    Args:
        size: (H, W) of the input; default the model's crop.
        batch: images per call.
        iters: timed calls.
        warmup: untimed calls before them.
        precision: fp32, or bf16 / fp16 autocast.
    """
    if batch < 1 or iters < 1 or warmup < 0:
        raise RegproxyError(f"need batch >= 1, iters >= 1 and warmup >= 0, got {batch}, {iters}, {warmup}")
    check_int8_model(model, precision)
    config = model.config
    height, width = size or (config.crop_size, config.crop_size)
    if min(height, width) < 1:
        raise RegproxyError(f"size must have positive sides, got {height}x{width}")
    device = device_of(model)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width, generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with autocast(device, precision):
        kernel = getattr(model.backbone, "attention_kernel", None)
        attention = kernel(height, width) if kernel is not None else None
        for step in range(warmup + iters):
            synchronize(device)
            start = time.perf_counter()
            model.labels(x)
            synchronize(device)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    total = sum(times)
    per_image = [1000 * t / batch for t in times]
    return BenchmarkResult(
        backbone=config.backbone, size=(height, width), batch=batch, precision=precision, device=str(device),
        device_name=device_name(device), torch_version=torch.__version__, threads=torch.get_num_threads(),
        warmup=warmup, iters=iters, total_s=total, images_per_s=iters * batch / total,
        ms_per_image_median=statistics.median(per_image), ms_per_image_min=min(per_image),
        ms_per_image_max=max(per_image), times_ms=[1000 * t for t in times],
        max_memory_allocated=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        attention=attention, fast_path=cpu_fast_path() if device.type == "cpu" else None,
    )
