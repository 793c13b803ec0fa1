"""Option parsing shared by several commands."""

from __future__ import annotations

import torch

from regproxy_cli.cli.output import err_console
from regproxy_cli.errors import RegproxyError
from regproxy_cli.inference import autocast, compile_backbone

PRECISION_HELP = "fp32, or bf16 / fp16 autocast for the network (bf16: CPU or GPU, fp16: CUDA only)."
COMPILE_HELP = "torch.compile the backbone first (seconds to a minute); pays off over many images of one size."


def parse_device(device: str) -> torch.device:
    """``--device``: a torch device that exists on this machine, or one error line."""
    try:
        torch_device = torch.device(device)
        torch.empty(0, device=torch_device)
    except (RuntimeError, AssertionError) as exc:
        raise RegproxyError(f"--device {device}: {str(exc).splitlines()[0]}") from None
    return torch_device


def check_precision(precision: str, device: torch.device) -> str:
    """``--precision``: one this device runs, or one error line (before any image is read)."""
    autocast(device, precision)
    return precision


def compile_if(enabled: bool, model: torch.nn.Module, precision: str) -> None:
    """``--compile``: compile the backbone, warmed up at the model's crop size, behind a status line."""
    if enabled:
        crop = model.config.crop_size
        with err_console.status(f"compiling the backbone ({crop}x{crop} warm-up)"):
            compile_backbone(model, precision, size=(crop, crop))


def parse_size(option: str, value: str, *, square: bool = False) -> tuple[int, int]:
    """``HEIGHTxWIDTH`` (with ``square``, also a single N for NxN) as positive ints, or one error line."""
    form = "N or HEIGHTxWIDTH" if square else "HEIGHTxWIDTH"
    example = "512 or 512x683" if square else "1024x2048"
    parts = value.lower().split("x")
    try:
        sides = tuple(int(p) for p in parts)
    except ValueError:
        raise RegproxyError(f"{option} {value!r} must be {form}, e.g. {example}") from None
    if square and len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2:
        raise RegproxyError(f"{option} {value!r} must be {form}, e.g. {example}")
    if min(sides) < 1:
        raise RegproxyError(f"{option} {value!r} must have positive sides")
    return sides  # type: ignore[return-value]
