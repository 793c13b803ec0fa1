"""An exported ``.onnx`` file as a model: onnxruntime behind the ``nn.Module`` interface the inference code uses.

:class:`OnnxModel` maps a normalised (B, 3, H, W) batch to (B, K, H, W) logits like a PyTorch RegProxy, and
carries the :class:`~regproxy_cli.model.config.ModelConfig` stored in the file's metadata, so
:func:`~regproxy_cli.inference.predictor.predict_labels` (test scale, sliding windows, multi-scale + flip) and
:func:`~regproxy_cli.engine.evaluate.evaluate` run it unchanged: the protocol stays in Python, only the network
runs in the graph. Tensors stay on the CPU; the execution provider (``cpu``, ``openvino``, ``cuda``, ``tensorrt``)
decides where onnxruntime computes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from regproxy_cli.errors import RegproxyError
from regproxy_cli.io.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    config_from_metadata,
    onnx_metadata,
    onnx_session,
    onnxruntime_errors,
)


class OnnxModel(nn.Module):
    """An exported file run by onnxruntime: ``forward`` (logits), ``labels`` and ``config`` as a PyTorch model has.

    Args:
        path: the ``.onnx`` file (written by :func:`~regproxy_cli.io.export.export_onnx` or ``quantize_int8``).
        provider: ``cpu``, ``openvino``, ``cuda`` or ``tensorrt`` (one error line when onnxruntime lacks it).
        threads: intra-op threads (default ``torch.get_num_threads()``).
    """

    def __init__(self, path: str | os.PathLike, provider: str = "cpu", threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        meta = onnx_metadata(self.path)
        self.config = config_from_metadata(meta, self.path)
        self.quantization = meta.get("quantization", "none")
        self.provider = provider
        self.session = onnx_session(self.path, threads=threads, provider=provider)
        self.num_classes = self.config.num_classes
        # the inference code asks next(model.parameters()).device where to put its tensors: here, the CPU
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        declared = self.session.get_inputs()[0].shape  # ints for fixed dimensions, names for dynamic ones
        self.fixed_batch = declared[0] if isinstance(declared[0], int) else None
        self.fixed_size = tuple(declared[2:]) if all(isinstance(d, int) for d in declared[2:]) else None

    def extra_repr(self) -> str:
        return f"{self.path}, provider={self.provider}, quantization={self.quantization}"

    def to(self, *args, **kwargs) -> OnnxModel:
        """Only the CPU: onnxruntime takes host arrays (the provider, not the device, picks where it computes)."""
        device = kwargs.get("device", args[0] if args else None)
        if isinstance(device, torch.Tensor):
            device = device.device
        if isinstance(device, (str, torch.device)) and torch.device(device).type != "cpu":
            raise RegproxyError(f"{self.path.name} is an ONNX model: its tensors stay on the CPU (device cpu, not "
                                f"{device}); choose where onnxruntime computes with the provider (--provider)")
        return super().to(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) float32 logits of a normalised (B, 3, H, W) CPU batch."""
        if x.device.type != "cpu":
            raise RegproxyError(f"{self.path.name} is an ONNX model: give it CPU tensors, not {x.device}")
        if self.fixed_size is not None and tuple(x.shape[-2:]) != self.fixed_size:
            size = "x".join(map(str, self.fixed_size))
            raise RegproxyError(f"{self.path} was exported for {size} inputs only (--static), not "
                                f"{x.shape[-2]}x{x.shape[-1]}: export it again without --static")
        array = np.ascontiguousarray(x.detach().float().numpy())
        step = self.fixed_batch or len(array)
        return torch.cat([torch.from_numpy(self._run(array[i:i + step])) for i in range(0, len(array), step)])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        missing = (self.fixed_batch or len(batch)) - len(batch)  # a fixed-batch graph: pad the last chunk
        if missing:
            batch = np.concatenate([batch, np.zeros((missing, *batch.shape[1:]), batch.dtype)])
        try:
            logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        except onnxruntime_errors() as exc:
            raise RegproxyError(f"{self.path}: onnxruntime failed on a {'x'.join(map(str, batch.shape))} input "
                                f"({str(exc).strip().splitlines()[0]})") from exc
        return logits[: len(batch) - missing]

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) label maps of a normalised batch: the argmax of the logits at the input size."""
        return self(x).argmax(1)


def load_onnx_model(path: str | os.PathLike, provider: str | None = None, threads: int | None = None) -> OnnxModel:
    """An :class:`OnnxModel` in eval mode on ``provider`` (default ``cpu``)."""
    return OnnxModel(path, provider=provider or "cpu", threads=threads).eval()
