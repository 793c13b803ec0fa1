"""An exported ``.onnx`` file as a model: onnxruntime behind the ``nn.Module`` interface the inference code uses.

:class:`OnnxModel` maps a normalised (B, 3, H, W) batch to (B, K, H, W) logits like a PyTorch RegProxy, and
carries the :class:`~regproxy_cli.model.config.ModelConfig` stored in the file's metadata, so
:func:`~regproxy_cli.inference.predictor.predict_labels` (test scale, sliding windows, multi-scale + flip) and
:func:`~regproxy_cli.engine.evaluate.evaluate` run it unchanged: the protocol stays in Python, only the network
runs in the graph. Tensors stay on the CPU; the execution provider (``cpu``, ``openvino``, ``cuda``, ``tensorrt``)
decides where onnxruntime computes.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from regproxy_cli.errors import RegproxyError, missing_extra, require_extra
from regproxy_cli.model.base import SegmentationModel
from regproxy_cli.model.config import ModelConfig

INPUT_NAME, OUTPUT_NAME = "image", "logits"
META_PREFIX = "regproxy."
MISSING_EXTRA = missing_extra("export", "ONNX export")
# --provider names -> onnxruntime's execution providers, and the package that brings each
PROVIDERS = {"cpu": "CPUExecutionProvider", "openvino": "OpenVINOExecutionProvider",
             "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
PROVIDER_PACKAGES = {"cpu": "onnxruntime", "openvino": "onnxruntime-openvino", "cuda": "onnxruntime-gpu",
                     "tensorrt": "onnxruntime-gpu (with TensorRT)"}


def _onnx() -> tuple[ModuleType, ModuleType]:
    """The onnx and onnxruntime modules, or the one line telling how to install them."""
    return require_extra("onnx", "export", "ONNX export"), require_extra("onnxruntime", "export", "ONNX export")



def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``regproxy.*`` metadata of an exported file, without the prefix (values are strings, most JSON)."""
    onnx, _ = _onnx()
    _existing(path)
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}



def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise RegproxyError(f"{path}: no such ONNX file")
    return path



def onnxruntime_errors() -> tuple[type[Exception], ...]:
    """The exceptions onnxruntime raises for a bad file or input (its own types, with no common base but Exception)."""
    _onnx()
    from onnxruntime.capi import onnxruntime_pybind11_state as state  # where its exception types live

    return (state.Fail, state.InvalidArgument, state.InvalidGraph, state.InvalidProtobuf, state.NotImplemented,
            state.RuntimeException)



def execution_providers(provider: str = "cpu") -> list[str]:
    """onnxruntime's execution providers for ``provider`` (cpu, openvino, cuda, tensorrt), in priority order.

    The CPU comes last as the fallback for operators an accelerator lacks (TensorRT also falls back on CUDA). A
    provider this onnxruntime build does not have (``onnxruntime.get_available_providers()``) is one error line.
    """
    _, ort = _onnx()
    if provider not in PROVIDERS:
        raise RegproxyError(f"unknown ONNX provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    wanted = PROVIDERS[provider]
    if wanted not in available:
        present = ", ".join(name for name, ident in PROVIDERS.items() if ident in available)
        raise RegproxyError(
            f"this onnxruntime ({ort.__version__}) has no {wanted} (here: {present}); install "
            f"{PROVIDER_PACKAGES[provider]} in place of onnxruntime, or use the cpu provider"
        )
    chain = [wanted, PROVIDERS["cuda"] if provider == "tensorrt" else wanted, PROVIDERS["cpu"]]
    return [ident for ident in dict.fromkeys(chain) if ident in available]



def onnx_session(path: str | os.PathLike, threads: int | None = None, provider: str = "cpu"):
    """An onnxruntime ``InferenceSession`` for ``path`` on ``provider`` (see :func:`execution_providers`).

    All graph optimisations, ``threads`` intra-op threads (default ``torch.get_num_threads()``, so timings compare
    with PyTorch's) and one inter-op thread (the graph is a chain: the parallelism is inside the operators). A
    provider that is installed but cannot start (e.g. CUDA libraries missing: onnxruntime then quietly runs on the
    CPU) is one error line.
    """
    _, ort = _onnx()
    path = _existing(path)
    if threads is not None and threads < 1:
        raise RegproxyError(f"threads must be at least 1, got {threads}")
    providers = execution_providers(provider)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        with warnings.catch_warnings(record=True) as caught:  # why a provider did not start, if one did not
            warnings.simplefilter("always")
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except onnxruntime_errors() as exc:
        raise RegproxyError(f"{path}: onnxruntime cannot load it ({str(exc).strip().splitlines()[0]})") from None
    if session.get_providers()[0] != providers[0]:
        reason = f" ({' '.join(str(caught[0].message).split())})" if caught else ""
        raise RegproxyError(f"onnxruntime could not start {providers[0]} for {path}{reason}; check the "
                            "accelerator's libraries, or use the cpu provider")
    for warning in caught:  # the others are the caller's business, as without the recording
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return session



def config_from_metadata(meta: dict[str, str], path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` in the ``regproxy.config`` of an exported file's metadata (:func:`onnx_metadata`),
    or one error line naming ``path``."""
    if "config" not in meta:
        raise RegproxyError(f"{path}: its metadata has no {META_PREFIX}config (classes, normalisation, test protocol): "
                            "export it with `regproxy export` from a model directory")
    try:
        data = json.loads(meta["config"])
    except json.JSONDecodeError as exc:
        raise RegproxyError(f"{path}: {META_PREFIX}config is not valid JSON ({exc})") from None
    return ModelConfig.from_dict(data, where=f"{path} ({META_PREFIX}config)")


class OnnxModel(SegmentationModel):
    """An exported file run by onnxruntime: ``forward`` (logits), ``labels`` and ``config`` as a PyTorch model has.

    Args:
        path: the ``.onnx`` file (written by :func:`~regproxy_cli.onnx.export.export_onnx` or ``quantize_int8``).
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


def load_onnx_model(path: str | os.PathLike, provider: str | None = None, threads: int | None = None) -> OnnxModel:
    """An :class:`OnnxModel` in eval mode on ``provider`` (default ``cpu``)."""
    return OnnxModel(path, provider=provider or "cpu", threads=threads).eval()
