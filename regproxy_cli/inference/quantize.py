"""``--precision int8``: the backbone's linear layers as oneDNN int8 matrix products, on CPU.

Where the time goes in a ViT at 512^2 is the blocks' linear layers (qkv, proj, fc1, fc2: about 70% of S/16's
multiply-adds; the attention products are most of the rest). :func:`quantize_int8` swaps each ``nn.Linear`` of the
backbone for an :class:`Int8Linear` once, when the model is opened for inference:

* weights: int8, symmetric, one scale per output channel (the max |w| of the row / 127), packed once for oneDNN;
* activations: uint8 (7 bits on CPUs without VNNI: :func:`activation_qmax`), asymmetric, one scale and zero point
  per call from the input's min and max (dynamic), or fixed ones measured on calibration images (static,
  :func:`calibrate_int8`);
* the product: ``torch.ops.onednn.qlinear_pointwise`` (PyTorch's own x86 int8 kernel, the one inductor's int8
  lowering calls): u8 x s8 -> s32 on the CPU's int8 dot-product units (AVX512-VNNI, AMX-INT8 where there is AMX),
  dequantised to float32 with the bias added in the same kernel, and timm's ``fc1 -> GELU`` fused as its post-op.

Everything else (patch embedding, LayerNorms, the attention products and softmax, the residual stream, the proxy
head and the label step) stays float32, so int8 changes labels only through the linear layers' rounding.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch
from torch import nn

from regproxy_cli.errors import RegproxyError

# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) below the int8 dot-product instructions (VNNI)
CAPS_WITHOUT_VNNI = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE"})


@functools.cache  # the CPU and oneDNN's cap are fixed for the process
def activation_qmax() -> int:
    """The largest uint8 activation code: 255 on CPUs with VNNI (AVX512-VNNI, AVX-VNNI, AMX-INT8), whose u8 x s8
    dot products accumulate in int32. Without VNNI oneDNN multiplies u8 x s8 pairs into int16 (``vpmaddubsw``),
    which saturates when both are near full scale (255 x 127 x 2 > 32767): wrong outputs, measured on an AVX2
    EPYC (a max error of 30% of the output range). There the activations keep 7 bits (PyTorch's ``reduce_range``)."""
    from regproxy_cli.model.attention import cpu_info

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_info()[1])
    return 255 if vnni and cap not in CAPS_WITHOUT_VNNI else 127


@functools.cache  # one probe per process
def int8_supported() -> str | None:
    """Why this PyTorch cannot run int8 here (one line), or None when it can.

    Besides the ops being there, one tiny product with each post-op used is run: the ops' schema and post-ops have
    changed across PyTorch versions, and a refusal is better found here than on the first image."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn)"
    missing = [op for op in ("qlinear_prepack", "qlinear_pointwise") if not hasattr(torch.ops.onednn, op)]
    if missing:
        return f"this PyTorch ({torch.__version__}) has no torch.ops.onednn.{missing[0]}"
    try:
        probe = nn.Linear(8, 4)
        with torch.inference_mode():
            for gelu in (False, True):
                Int8Linear(probe, gelu=gelu)(torch.ones(2, 8))
    except (RuntimeError, TypeError, NotImplementedError) as exc:  # schema or post-op this PyTorch does not have
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"this PyTorch's ({torch.__version__}) oneDNN int8 linear refused a test product: {message[:160]}"
    return None


def check_int8(device: torch.device | str) -> None:
    """One error line unless ``device`` can run ``--precision int8`` (a CPU, with PyTorch's oneDNN int8 kernels)."""
    if torch.device(device).type != "cpu":
        raise RegproxyError("--precision int8 runs on CPU only (oneDNN's int8 kernels); use bf16 or fp16 on a GPU")
    reason = int8_supported()
    if reason is not None:
        raise RegproxyError(f"--precision int8 is not available: {reason}; use fp32 or bf16")


def _activation_qparams(low: float, high: float) -> tuple[float, int]:
    """uint8 scale and zero point covering [low, high] (widened to hold 0, so zero padding stays exact)."""
    low, high = min(low, 0.0), max(high, 0.0)
    qmax = activation_qmax()
    scale = max((high - low) / qmax, 1e-8)
    return scale, min(max(round(-low / scale), 0), qmax)


class Int8Linear(nn.Module):
    """An inference-only ``nn.Linear`` computed as u8 activations x s8 per-channel weights in oneDNN.

    ``gelu`` fuses an exact (erf) GELU after the product, as timm's ``Mlp`` applies after ``fc1``. With
    ``static`` scale and zero point the input's range is fixed (calibrated); without, each call measures it.
    """

    def __init__(self, linear: nn.Linear, *, gelu: bool = False, static: tuple[float, int] | None = None) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = weight.abs().amax(dim=1).clamp_min(1e-8) / 127
        quantized = torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.register_buffer("weight_zero_point", torch.zeros(self.out_features, dtype=torch.int64), persistent=False)
        self.register_buffer("packed", torch.ops.onednn.qlinear_prepack(quantized, None), persistent=False)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        self.post_op = "gelu" if gelu else "none"
        self.static = static

    def extra_repr(self) -> str:
        scales = "static" if self.static else "dynamic"
        return f"{self.in_features}, {self.out_features}, int8 ({scales} activation scale), post-op {self.post_op}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RegproxyError("an int8 model is for inference only; train at fp32 or bf16")
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).float()
        if self.static is not None:
            scale, zero = self.static
        else:
            low, high = torch.aminmax(flat)
            scale, zero = _activation_qparams(float(low), float(high))
        # one in-place chain: x / scale + zero, rounded to nearest and clamped into uint8
        quantized = flat.mul(1.0 / scale).add_(zero).round_().clamp_(0, activation_qmax()).to(torch.uint8)
        out = torch.ops.onednn.qlinear_pointwise(
            quantized, scale, zero, self.packed, self.weight_scale, self.weight_zero_point, self.bias,
            1.0, 0, torch.float32, self.post_op, [], "none",
        )
        return out.reshape(*shape[:-1], self.out_features)


def check_int8_model(model: nn.Module, precision: str) -> None:
    """At ``precision`` int8 the model must have been converted (:func:`quantize_int8`): otherwise it would run
    float32 while saying int8. One error line."""
    if precision == "int8" and not any(isinstance(m, Int8Linear) for m in getattr(model, "backbone", model).modules()):
        raise RegproxyError("precision int8 needs a model converted by regproxy_cli.inference.quantize.quantize_int8 "
                            "first (the CLI does it when it opens the model)")


def _linears(backbone: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every plain ``nn.Linear`` inside ``backbone``."""
    found = []
    for parent in backbone.modules():
        for attribute, child in parent.named_children():
            if type(child) is nn.Linear:
                found.append((parent, attribute, child))
    return found


@torch.inference_mode()
def calibrate_int8(model: nn.Module, images: Iterable[torch.Tensor]) -> dict[int, tuple[float, int]]:
    """Static activation ranges: each backbone linear layer's input min/max over ``images`` (normalised (1, 3, H, W)
    tensors on the model's device, run whole through ``model.labels``), as {id(layer): (scale, zero point)}."""
    ranges: dict[int, tuple[float, float]] = {}
    hooks = []

    def record(layer: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        low, high = torch.aminmax(inputs[0].float())
        old = ranges.get(id(layer), (0.0, 0.0))
        ranges[id(layer)] = (min(old[0], float(low)), max(old[1], float(high)))

    for _, _, layer in _linears(model.backbone):
        hooks.append(layer.register_forward_hook(record))
    try:
        seen = 0
        for image in images:
            model.labels(image)
            seen += 1
    finally:
        for hook in hooks:
            hook.remove()
    if not seen:
        raise RegproxyError("int8 calibration needs at least one image")
    return {key: _activation_qparams(*span) for key, span in ranges.items()}


def quantize_int8(model: nn.Module, calibration: dict[int, tuple[float, int]] | None = None) -> int:
    """Swap the backbone's ``nn.Linear`` layers for :class:`Int8Linear` in place; returns how many were swapped.

    ``calibration`` (from :func:`calibrate_int8` on this same model) fixes each layer's activation range; without it
    each call measures its own (dynamic: no calibration set to choose, and every image gets its own range, for a
    min/max reduction per layer). Weights are read once: a model changed afterwards needs quantizing again.
    """
    check_int8(next(model.parameters()).device)
    swapped = 0
    for parent, attribute, layer in _linears(model.backbone):
        activation = getattr(parent, "act", None)
        # timm's Mlp: fc1 -> act -> drop -> norm -> fc2; the exact GELU is fused into fc1's kernel when the rest of
        # that chain is identity at inference (dropout off in eval mode, no norm)
        gelu = (attribute == "fc1" and isinstance(activation, nn.GELU) and activation.approximate == "none"
                and isinstance(getattr(parent, "norm", nn.Identity()), nn.Identity))
        static = calibration.get(id(layer)) if calibration is not None else None
        setattr(parent, attribute, Int8Linear(layer, gelu=gelu, static=static))
        if gelu:
            parent.act = nn.Identity()
        swapped += 1
    if not swapped:
        raise RegproxyError("--precision int8 found no linear layers in this model's backbone; use fp32 or bf16")
    return swapped
