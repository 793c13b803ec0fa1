"""How the network runs: on which device, TF32 policy, precision (autocast) and ``torch.compile``."""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from regproxy_cli.constants import PRECISIONS
from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.attention import cpu_info

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32 and int8: no autocast


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast computes in at ``precision`` (one of PRECISIONS), or None for plain fp32."""
    if precision not in PRECISIONS:
        raise RegproxyError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return AUTOCAST_DTYPES.get(precision)


def resolve_device(device: str, gpu: int | None = None) -> torch.device:
    """A torch device that exists on this machine, with its index for CUDA, or one error line.

    ``auto`` is a GPU when there is one, else the CPU; ``auto`` and ``cuda`` take GPU ``gpu`` (under torchrun the
    caller passes the process's) or the current one; ``cuda:N`` must be a visible GPU.
    """
    if device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        torch_device = torch.device("cuda" if device == "auto" else device)
    except RuntimeError as exc:
        raise RegproxyError(f"device {device}: {str(exc).splitlines()[0]}") from None
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise RegproxyError(f"device {device}: CUDA is not available on this machine (use cpu)")
        count = torch.cuda.device_count()
        index = torch_device.index if torch_device.index is not None else (
            torch.cuda.current_device() if gpu is None else gpu)
        if not 0 <= index < count:
            raise RegproxyError(f"device {device}: GPU {index} does not exist here ({count} visible: "
                                f"{', '.join(f'cuda:{i}' for i in range(count))}; see CUDA_VISIBLE_DEVICES)")
        return torch.device("cuda", index)
    try:
        torch.empty(0, device=torch_device)
    except (RuntimeError, AssertionError) as exc:
        raise RegproxyError(f"device {device}: {str(exc).splitlines()[0]}") from None
    return torch_device


TF32_ENV = "REGPROXY_TF32"  # 1: allow TF32 in matmuls and convolutions for commands without a config (eval, predict)


def set_tf32(enabled: bool | None = None) -> bool:
    """Apply the TF32 policy to matmuls and cuDNN convolutions alike; returns it.

    PyTorch's own defaults differ (matmuls full fp32, cuDNN convolutions TF32), which makes fp32 neither exact nor
    fast on Ampere and later. Default off: fp32 means fp32 (CPU parity, the paper's V100 had no TF32); ``True``
    (``run.tf32``, ``REGPROXY_TF32=1``) trades ~10 mantissa bits for speed. ``None`` reads ``REGPROXY_TF32``.
    """
    if enabled is None:
        enabled = os.environ.get(TF32_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a GPU's kernels run asynchronously); nothing to wait for on a CPU.

    Timings call it before reading the clock, so a call's time is its whole work.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def tf32_state() -> dict[str, bool]:
    """Whether TF32 is allowed now, for matmuls and for cuDNN (what a benchmark should record)."""
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


BF16_EMULATED = ("bf16 on this CPU runs without bf16 instructions (no AVX512-BF16 or AMX): measured 7.5x slower "
                 "than fp32 on an AVX2-only AMD EPYC; fp32 (or int8) is the fast path here")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16). True where the flags cannot be read
    (no /proc/cpuinfo): then nothing is known, and nothing is said."""
    flags = cpu_info()[1]
    return not flags or bool({"avx512_bf16", "amx_bf16"} & flags)


def autocast(device: torch.device | str, precision: str = "fp32") -> torch.autocast:
    """The autocast context for running a model at ``precision`` (fp32: a disabled one, i.e. plain fp32).

    bf16 runs on CPUs (fast where they have AVX512-BF16 or AMX) and GPUs; fp16 only on CUDA. int8 is a conversion of
    the model made once when it is opened (:func:`regproxy_cli.inference.quantize.quantize_int8`), on CPU only; its
    context is a disabled one: what the int8 layers do not compute runs in float32.
    """
    dtype = autocast_dtype(precision)
    device_type = torch.device(device).type
    if precision == "fp16" and device_type != "cuda":
        raise RegproxyError("fp16 needs a CUDA device; use bf16 on CPU")
    if precision == "int8" and device_type != "cpu":
        raise RegproxyError("--precision int8 runs on CPU only (oneDNN's int8 kernels); use bf16 or fp16 on a GPU")
    if precision == "bf16" and device_type == "cpu" and not cpu_has_bf16():
        warnings.warn(BF16_EMULATED, RuntimeWarning, stacklevel=2)
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def compile_backbone(model: nn.Module, precision: str = "fp32", size: tuple[int, int] | None = None) -> None:
    """``--compile``: ``torch.compile`` the backbone in place (with inductor's freezing of the inference weights).

    The backbone is where the time goes; the head and the label step are small or already fused kernels. One warm-up
    forward at ``size`` (the sliding window; default 2x2 tokens) compiles it now, so a machine without what inductor
    needs (a C++ compiler on CPU, Triton on GPU) gives one error line before any image is read. Other input sizes
    compile again on first sight (then with dynamic shapes). Measured on CPU (bench/run.py --compile): S/16 at 512^2
    ~5% faster after ~15 s of compiling; worth it for many images of one size, not for one photo. After a failure
    the backbone stays marked for compiling (there is no public undo): reload the model to run it eagerly.
    """
    backbone = model.backbone
    stride = backbone.stride
    first = next(model.parameters())
    backbone.compile(options={"freezing": True})
    example = torch.zeros(1, 3, *(size or (2 * stride, 2 * stride)), device=first.device)
    try:
        with torch.inference_mode(), autocast(first.device, precision):
            backbone(example)
    except RuntimeError as exc:  # dynamo's and inductor's errors (no C++ compiler, no Triton, unsupported op)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegproxyError(f"torch.compile failed on this machine ({message}); run without --compile") from exc
