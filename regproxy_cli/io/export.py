"""Export a RegProxy model (or the linear baseline) to ONNX, check it against PyTorch, and open it with onnxruntime.

The exported graph takes ``image``, a normalised float32 (B, 3, H, W) RGB batch ((pixel - mean) / std on 0-255
values), and returns ``logits``, (B, K, H, W) float32. By default batch, height and width are all dynamic: any
H x W works, not only multiples of the backbone's stride, and the ViT position embeddings are resized inside the
graph. The model's :class:`~regproxy_cli.model.config.ModelConfig` (classes, palette, normalisation, inference
protocol) is stored in the file's metadata, so the ``.onnx`` alone is enough to deploy the model.

The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is used on purpose: on torch 2.15 the
torch.export-based exporter took 18 s on a 2-block test ViT, produced a graph whose batch dimension failed in
onnxruntime for a batch other than the traced one, and had not finished a tiny hybrid (ResNet stem) after 9
minutes; the TorchScript exporter takes about a second and matches PyTorch to 1e-6.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from regproxy_cli.constants import IMAGENET_MEAN, IMAGENET_STD, VERSION
from regproxy_cli.errors import RegproxyError
from regproxy_cli.files import write_atomic

MIN_OPSET = 17
MAX_OPSET = 20  # the newest opset the TorchScript-based exporter writes
INPUT_NAME, OUTPUT_NAME = "image", "logits"
META_PREFIX = "regproxy."
MISSING_EXTRA = "ONNX export needs the 'export' extra: pip install 'regproxy[export]'"


def _onnx() -> tuple[ModuleType, ModuleType]:
    """The onnx and onnxruntime modules, or the one line telling how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise RegproxyError(MISSING_EXTRA) from None
    return onnx, onnxruntime


class _PadToStride(nn.Module):
    """Pads the input to a multiple of the backbone's stride inside the graph, and crops the logits back.

    The backbone pads too, but behind a Python ``if`` that the tracer freezes at the example's size; padding
    here by a computed (possibly zero) amount keeps every H x W valid in the exported graph. The result is the
    model's own: it pads bottom/right with zeros and crops as well.
    """

    def __init__(self, model: nn.Module, stride: int) -> None:
        super().__init__()
        self.model = model
        self.stride = stride

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        padded = F.pad(image, (0, (self.stride - width % self.stride) % self.stride,
                               0, (self.stride - height % self.stride) % self.stride))
        return self.model(padded)[..., :height, :width]


def _stride(model: nn.Module) -> int:
    return int(getattr(getattr(model, "backbone", None), "stride", 1))


def _trace_size(model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """The example size to trace a dynamic graph with.

    The backbone resizes its position embedding only when the token grid differs from the stored one (a Python
    ``if``, frozen by the tracer); tracing on the stored grid would leave the resize out and fix the graph to
    that grid. One extra row of tokens keeps it in; on the stored grid the bicubic resize is then the identity.
    """
    stride = _stride(model)
    grid = getattr(getattr(model, "backbone", None), "pos_grid", None)
    height, width = size
    if grid is not None and (-(-height // stride), -(-width // stride)) == tuple(grid):
        height += stride
    return height, width


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Inference behaviour (BatchNorm statistics, no drop path) for a while; the caller's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _metadata(model: nn.Module, size: tuple[int, int], batch: int, dynamic: bool) -> dict[str, str]:
    config = getattr(model, "config", None)
    meta = {
        "version": VERSION,
        "input": f"{INPUT_NAME}: float32 (B, 3, H, W) RGB, (pixel - mean) / std with pixel in 0-255",
        "output": f"{OUTPUT_NAME}: float32 (B, K, H, W) class logits at the input size",
        "mean": json.dumps(list(getattr(config, "mean", IMAGENET_MEAN))),
        "std": json.dumps(list(getattr(config, "std", IMAGENET_STD))),
        "dynamic_axes": "batch,height,width" if dynamic else "none",
        "export_shape": json.dumps([batch, 3, *size]),
    }
    if config is not None and hasattr(config, "to_dict"):
        meta["config"] = json.dumps(config.to_dict())
    if config is not None and getattr(config, "classes", None):
        meta["classes"] = json.dumps(list(config.classes))
    return {META_PREFIX + key: value for key, value in meta.items()}


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    size: tuple[int, int] | int = (512, 512),
    batch: int = 1,
    opset: int = 17,
    dynamic: bool = True,
) -> Path:
    """Export ``model`` (normalised (B, 3, H, W) -> (B, K, H, W) logits) to an ONNX file, written atomically.

    Args:
        model: a RegProxy or LinearBaseline (any module with that signature; ``model.config`` goes to metadata).
        path: the ``.onnx`` file to write; missing parent directories are created.
        size: (H, W) of the example input; with ``dynamic=False`` the only size the graph accepts.
        batch: batch of the example input; with ``dynamic=False`` the only batch the graph accepts.
        opset: ONNX opset, 17 to 20.
        dynamic: batch, height and width dynamic (any H x W; position embeddings are resized in the graph).
            ``False`` fixes the graph to (batch, 3, *size), for runtimes and compilers that want static shapes.

    Metadata (``metadata_props``, read back with :func:`onnx_metadata`): ``regproxy.config`` (the ModelConfig
    as JSON), ``regproxy.mean`` / ``regproxy.std`` (RGB 0-255), ``regproxy.classes``, ``regproxy.dynamic_axes``,
    ``regproxy.export_shape``, ``regproxy.input`` / ``regproxy.output`` and ``regproxy.version``.
    """
    onnx, _ = _onnx()
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise RegproxyError(f"export size must be two positive integers (height, width), got {size!r}")
    if batch < 1:
        raise RegproxyError(f"export batch must be at least 1, got {batch}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise RegproxyError(f"ONNX opset {opset} is not supported: use {MIN_OPSET} to {MAX_OPSET}")
    path = Path(path)
    if path.is_dir():
        raise RegproxyError(f"{path} is a directory: give the .onnx file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RegproxyError(f"cannot create {path.parent}: {exc.strerror or exc}") from None

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    example = torch.randn(batch, 3, *(_trace_size(model, size) if dynamic else size), device=device)
    axes = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with _eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns at every Python-level shape test; _PadToStride and _trace_size handle those that
        # matter, and the deprecation notice about this exporter is for torch developers, not our users.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                _PadToStride(model, _stride(model)) if dynamic else model, (example,), buffer,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes} if dynamic else None,
                do_constant_folding=True, dynamo=False,
            )
        except (torch.onnx.errors.OnnxExporterError, torch.onnx.errors.UnsupportedOperatorError, RuntimeError) as exc:
            raise RegproxyError(f"ONNX export failed: {str(exc).strip().splitlines()[0]}") from exc
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, _metadata(model, size, batch, dynamic))
    proto.doc_string = "RegProxy semantic segmentation (Zhang et al., CVPR 2022), exported by regproxy"
    try:
        write_atomic(path, lambda tmp: onnx.save_model(proto, tmp))
    except OSError as exc:
        raise RegproxyError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


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


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU ``InferenceSession`` for ``path``: all graph optimisations, ``threads`` intra-op threads
    (default ``torch.get_num_threads()``, so timings compare with PyTorch's) and one inter-op thread (the graph
    is a chain: the parallelism is inside the operators)."""
    _, ort = _onnx()
    path = _existing(path)
    if threads is not None and threads < 1:
        raise RegproxyError(f"threads must be at least 1, got {threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    from onnxruntime.capi import onnxruntime_pybind11_state as state  # where its exception types live

    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except (state.Fail, state.InvalidProtobuf, state.InvalidGraph) as exc:
        raise RegproxyError(f"{path}: onnxruntime cannot load it ({str(exc).strip().splitlines()[0]})") from None


def check_onnx(path: str | os.PathLike, model: nn.Module, inputs: torch.Tensor) -> float:
    """Largest absolute difference between the exported file's logits (onnxruntime, CPU) and ``model``'s (fp32).

    An input whose shape the file does not accept (one exported with ``dynamic=False``) is one error line.
    """
    session = onnx_session(path)
    declared = session.get_inputs()[0].shape  # ints for fixed dimensions, names for dynamic ones
    if len(declared) != inputs.dim() or any(isinstance(d, int) and d != s for d, s in zip(declared, inputs.shape)):
        fixed = "x".join(str(d) if isinstance(d, int) else "?" for d in declared)
        raise RegproxyError(
            f"{path} takes inputs of shape {fixed}, not {'x'.join(map(str, inputs.shape))}: it was exported with a "
            "fixed shape; export again without --static (dynamic=True) for other sizes"
        )
    first = next(model.parameters(), None)
    with _eval_mode(model), torch.no_grad():
        expected = model(inputs.to(first.device if first is not None else "cpu", torch.float32)).float().cpu()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.detach().float().cpu().numpy()})[0]
    if tuple(got.shape) != tuple(expected.shape):
        raise RegproxyError(f"{path}: ONNX logits have shape {tuple(got.shape)}, PyTorch's {tuple(expected.shape)}")
    return float((torch.from_numpy(got) - expected).abs().max())
