"""Which attention kernel a ViT runs on the CPU under bf16 autocast: measured on this machine, not assumed.

PyTorch offers two: SDPA (a fused flash-attention kernel) and the explicit ``softmax(q k^T / sqrt(d)) v`` with its
two batched products. Which is faster in bf16 depends on the CPU and the torch build, in both directions: on an AMD
EPYC with AVX512-BF16 (torch 2.15) the explicit path made S/16 at 512^2 1.6x faster than fp32 where SDPA gave 1.3x;
on an Intel Xeon with AMX (torch 2.14) SDPA gives 2.7x and the explicit path 2.2x (bench/run.py, fastpath). So the
first CPU bf16 forward of a shape times both on random tensors of that shape (a few milliseconds) and keeps the
faster; the choice is stored per machine (CPU model, torch version, threads) in ``cpu-kernels.json`` under the
regproxy cache folder, so later processes skip the timing. ``REGPROXY_ATTENTION=sdpa|explicit`` forces one.
fp32 and GPUs keep timm's own choice (SDPA).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from regproxy_cli.constants import cache_dir
from regproxy_cli.errors import RegproxyError
from regproxy_cli.files import write_text_atomic

ATTENTION_ENV = "REGPROXY_ATTENTION"
KERNELS = ("sdpa", "explicit")
_chosen: dict[str, str] = {}  # key -> kernel, this process


@functools.cache  # read once per process: the forward asks on every CPU bf16 call
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags (from /proc/cpuinfo where there is one; no flags elsewhere)."""
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, flags
    for line in info.splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = frozenset(line.split(":", 1)[1].split())
            break
    return name, flags


def cpu_description() -> str:
    """The CPU's model name and its matrix extensions, the part of the machine a kernel choice depends on."""
    name, flags = cpu_info()
    return " ".join([name, *(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags)])


def _key(tokens: int, heads: int, head_dim: int) -> str:
    return (f"{cpu_description()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"bf16 attention {heads}x{tokens}x{head_dim}")


def time_attention(tokens: int, heads: int, head_dim: int, rounds: int = 3) -> dict[str, float]:
    """Seconds per call of each kernel on random bf16 (1, heads, tokens, head_dim) tensors: the best of ``rounds``."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=generator).bfloat16() for _ in range(3))
    scale = head_dim ** -0.5

    def explicit() -> torch.Tensor:
        return ((q * scale) @ k.transpose(-2, -1)).softmax(-1) @ v  # timm's non-fused path

    calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v), "explicit": explicit}
    best = dict.fromkeys(calls, float("inf"))
    with torch.inference_mode():
        for name, call in calls.items():
            call()  # warm-up: kernel selection, allocator
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def cpu_bf16_attention(tokens: int, heads: int, head_dim: int) -> str:
    """``sdpa`` or ``explicit``: the faster attention kernel for this shape on this CPU in bf16 (see the module)."""
    forced = os.environ.get(ATTENTION_ENV, "auto").strip().lower()
    if forced in KERNELS:
        return forced
    if forced not in ("", "auto"):
        raise RegproxyError(f"{ATTENTION_ENV} must be sdpa, explicit or auto, got {forced!r}")
    key = _key(tokens, heads, head_dim)
    if key not in _chosen:
        path = cache_dir() / "cpu-kernels.json"
        stored = _read(path)
        if stored.get(key) in KERNELS:
            _chosen[key] = stored[key]
        else:
            times = time_attention(tokens, heads, head_dim)
            _chosen[key] = min(times, key=times.get)
            _write(path, {**_read(path), key: _chosen[key]})
    return _chosen[key]


def _read(path: Path) -> dict:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):  # no cache yet, or a damaged one: measure again and rewrite it
        return {}
    return stored if isinstance(stored, dict) else {}


def _write(path: Path, data: dict) -> None:
    """Store the choices; a cache folder that cannot be written only costs a re-measure in the next process."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError:
        return
