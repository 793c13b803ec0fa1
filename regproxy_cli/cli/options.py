"""Options several commands share: one spelling, one parser, one help text each."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from regproxy_cli.constants import INFERENCE_MODES, PRECISIONS
from regproxy_cli.errors import RegproxyError

if TYPE_CHECKING:
    import torch

    from regproxy_cli.engine.distributed import Runtime

# Typer's choices are Enums: built from the one list in constants, so a new precision or mode is one edit there.
Mode = Enum("Mode", {name: name for name in INFERENCE_MODES}, type=str)
Mode.__doc__ = "How a model sees an image: whole, or in crop-sized sliding windows."
Precision = Enum("Precision", {name: name for name in PRECISIONS}, type=str)
Precision.__doc__ = "The network's precision: fp32, bf16 / fp16 autocast, or int8 linear layers (CPU)."


class Provider(str, Enum):
    """Where onnxruntime runs an .onnx model (regproxy_cli.onnx.runtime.PROVIDERS maps these to its providers)."""

    cpu = "cpu"
    openvino = "openvino"
    cuda = "cuda"
    tensorrt = "tensorrt"


MODEL_HELP = "Zoo name (see `regproxy models`), Hub repo id (owner/name), model directory or authors' .pth file."
PRECISION_HELP = ("The network's precision: fp32, or bf16 / fp16 autocast (bf16: CPU or GPU, fp16: CUDA only), or int8 "
                  "(CPU only: the backbone's linear layers in oneDNN int8).")
COMPILE_HELP = "torch.compile the backbone first (seconds to a minute); pays off over many images of one size."
DEVICE_HELP = "auto (the first CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:1, mps ..."
MODE_HELP = "whole | slide (default: the model's own protocol)."
PROVIDER_HELP = ("Where onnxruntime runs an .onnx --model: cpu, or openvino / cuda / tensorrt where this onnxruntime "
                 "has them (onnxruntime-openvino, onnxruntime-gpu).")
WINDOW_BATCH_HELP = ("Sliding windows per forward pass (on a CPU the network still runs them one at a time, "
                     "which is faster there).")

ModelOption = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
DeviceOption = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
ModeOption = Annotated[Mode | None, typer.Option("--mode", help=MODE_HELP)]
PrecisionOption = Annotated[Precision, typer.Option("--precision", help=PRECISION_HELP)]
WindowBatchOption = Annotated[int, typer.Option("--window-batch", help=WINDOW_BATCH_HELP)]
CompileOption = Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)]
ProviderOption = Annotated[Provider, typer.Option("--provider", help=PROVIDER_HELP)]
TtaOption = Annotated[bool, typer.Option("--tta", help="The paper's multi-scale (0.5-1.75) + flip test.")]
OPACITY_HELP = "Weight of the class colours in the overlay, 0 (photo only) to 1 (colours only)."
OpacityOption = Annotated[float, typer.Option("--opacity", help=OPACITY_HELP)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON (stdout) instead of tables.")]


def parse_device(device: str) -> torch.device:
    """``--device``: a torch device that exists on this machine (``auto``: CUDA when present), or one error line."""
    from regproxy_cli.inference.runtime import resolve_device, set_tf32

    try:
        torch_device = resolve_device(device)
    except RegproxyError as exc:
        raise RegproxyError(f"--{exc}") from None
    if torch_device.type == "cuda":
        set_tf32()  # the documented policy (REGPROXY_TF32), not PyTorch's mixed defaults
    return torch_device


def model_device(device: str, model: str) -> str:
    """``--device`` for ``--model``: ``auto`` is the CPU for an .onnx file, whose tensors stay on the host (its
    --provider picks where onnxruntime computes)."""
    return "cpu" if device == "auto" and Path(model).suffix.lower() == ".onnx" else device


def start_runtime(device: str) -> Runtime:
    """``--device`` for a command that runs under ``torchrun`` too: this process's device, the process group started."""
    from regproxy_cli.engine.distributed import setup_runtime

    try:
        return setup_runtime(device)
    except RegproxyError as exc:
        raise RegproxyError(f"--{exc}") from None


def check_window_batch(window_batch: int) -> int:
    if window_batch < 1:
        raise RegproxyError(f"--window-batch must be at least 1, got {window_batch}")
    return window_batch


def check_batch(batch: int) -> int:
    if batch < 1:
        raise RegproxyError(f"--batch must be at least 1, got {batch}")
    return batch


def check_precision(precision: Precision, device: torch.device) -> str:
    """``--precision``: one this device runs, or one error line (before any image is read)."""
    from regproxy_cli.inference.quantize import check_int8
    from regproxy_cli.inference.runtime import autocast

    autocast(device, precision.value)
    if precision.value == "int8":
        check_int8(device)
    return precision.value


def parse_size(option: str, value: str, *, square: bool = False) -> tuple[int, int]:
    """``HEIGHTxWIDTH`` (with ``square``, also a single N for NxN) as positive ints, or one error line."""
    form = "N or HEIGHTxWIDTH" if square else "HEIGHTxWIDTH"
    example = "512 or 512x683" if square else "1024x2048"
    parts = value.lower().replace("×", "x").split("x")
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
