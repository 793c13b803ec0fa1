"""Export a RegProxy model (or the linear baseline) to ONNX, check it against PyTorch, and open it with onnxruntime.

The exported graph takes ``image``, a normalised float32 (B, 3, H, W) RGB batch ((pixel - mean) / std on 0-255
values), and returns ``logits``, (B, K, H, W) float32. By default batch, height and width are all dynamic: any
H x W works, not only multiples of the backbone's stride, and the ViT position embeddings are resized inside the
graph. The model's :class:`~regproxy_cli.model.config.ModelConfig` (classes, palette, normalisation, inference
protocol) is stored in the file's metadata, so the ``.onnx`` alone is enough to deploy the model:
:class:`~regproxy_cli.onnx.runtime.OnnxModel` runs it on an onnxruntime execution provider (:func:`onnx_session`)
through the same inference code as a PyTorch model. :func:`quantize_int8` makes a static int8 copy, calibrated on
a :class:`CalibrationSet`; :func:`label_agreement` measures what that changed.

The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is used on purpose: on torch 2.15 the
torch.export-based exporter took 18 s on a 2-block test ViT, produced a graph whose batch dimension failed in
onnxruntime for a batch other than the traced one, and had not finished a tiny hybrid (ResNet stem) after 9
minutes; the TorchScript exporter takes about a second and matches PyTorch to 1e-6.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regproxy_cli.constants import IMAGE_SUFFIXES, MAX_OPSET, MIN_OPSET, VERSION
from regproxy_cli.data.open import detect_kind, open_dataset
from regproxy_cli.errors import RegproxyError
from regproxy_cli.files import write_atomic
from regproxy_cli.images import load_image
from regproxy_cli.inference.predictor import normalise, predict_labels
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.onnx.runtime import (
    INPUT_NAME,
    META_PREFIX,
    OUTPUT_NAME,
    _onnx,
    config_from_metadata,
    onnx_metadata,
    onnx_session,
)


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


def _trace_size(model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """The example size to trace a dynamic graph with.

    The backbone resizes its position embedding only when the token grid differs from the stored one (a Python
    ``if``, frozen by the tracer); tracing on the stored grid would leave the resize out and fix the graph to
    that grid. One extra row of tokens keeps it in; on the stored grid the bicubic resize is then the identity.
    """
    stride = model.stride
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
    config = model.config
    meta = {
        "version": VERSION,
        "input": f"{INPUT_NAME}: float32 (B, 3, H, W) RGB, (pixel - mean) / std with pixel in 0-255",
        "output": f"{OUTPUT_NAME}: float32 (B, K, H, W) class logits at the input size",
        "mean": json.dumps(list(config.mean)),
        "std": json.dumps(list(config.std)),
        "dynamic_axes": "batch,height,width" if dynamic else "none",
        "export_shape": json.dumps([batch, 3, *size]),
    }
    meta["config"] = json.dumps(config.to_dict())
    if config.classes:
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
                _PadToStride(model, model.stride) if dynamic else model, (example,), buffer,
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


# Quantized operators: the matrix products, where the time goes. Quantizing everything onnxruntime can (adds,
# norms, softmax, the affinity head's constants) left 6-40% of a tiny ViT's labels unchanged; these alone, 98%.
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


class CalibrationSet:
    """The images a quantized model is calibrated and measured on: (image, label or None, name) per item.

    A dataset folder (one :func:`~regproxy_cli.data.open.open_dataset` recognises) gives up to ``limit`` images
    of its ``split``, evenly spread, with their labels (so it also works as an evaluation dataset); any other
    folder gives its images (``IMAGE_SUFFIXES``, searched recursively, sorted), evenly spread, without labels.
    """

    def __init__(self, folder: str | os.PathLike, limit: int = 32, split: str = "val") -> None:
        folder = Path(folder)
        if limit < 1:
            raise RegproxyError(f"the number of calibration images must be at least 1, got {limit}")
        if not folder.is_dir():
            raise RegproxyError(f"{folder}: no such calibration folder")
        try:
            kind = detect_kind(folder)
        except RegproxyError:
            kind = None
        self.folder = folder
        self.dataset = open_dataset(kind, folder, split) if kind else None
        self.paths = [] if kind else sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        total = len(self.dataset) if self.dataset is not None else len(self.paths)
        if total == 0:
            raise RegproxyError(f"{folder}: no images to calibrate on")
        self.indices = sorted({round(i * (total - 1) / max(limit - 1, 1)) for i in range(min(limit, total))})

    @property
    def labelled(self) -> bool:
        return self.dataset is not None

    @property
    def num_classes(self) -> int | None:
        return self.dataset.num_classes if self.dataset is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray | None, str]:
        if self.dataset is not None:
            return self.dataset[self.indices[index]]
        path = self.paths[self.indices[index]]
        return load_image(path), None, str(path.relative_to(self.folder))

    def images(self) -> Iterator[np.ndarray]:
        for index in range(len(self)):
            yield self[index][0]


def calibration_input(image: np.ndarray, config: ModelConfig, size: tuple[int, int]) -> np.ndarray:
    """A (1, 3, *size) float32 network input made as predict makes its input: the config's mean/std, then a
    bilinear resize of the whole image (the aspect ratio is not kept: the calibration sees the crop size)."""
    x = normalise(image, config)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).numpy()


def quantize_int8(
    source: str | os.PathLike,
    output: str | os.PathLike,
    calibration: CalibrationSet,
    *,
    size: tuple[int, int] | None = None,
) -> Path:
    """Static int8 quantization of an exported fp32 file, written atomically to ``output``.

    onnxruntime's ``quantize_static`` in QDQ format: per-channel 7-bit weights and int8 activations whose ranges
    are the min/max seen on ``calibration`` (each image whole, resized to ``size``, default the crop size, with
    :func:`calibration_input`), for the ``QUANTIZED_OPS``; the rest stays float32. The metadata is the source's
    plus ``regproxy.quantization`` = ``int8``.
    """
    onnx, _ = _onnx()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    meta = onnx_metadata(source)
    config = config_from_metadata(meta, source)
    size = size or (config.crop_size, config.crop_size)
    output = Path(output)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.inputs = (calibration_input(image, config, size) for image in calibration.images())

        def get_next(self) -> dict | None:
            x = next(self.inputs, None)
            return None if x is None else {INPUT_NAME: x}

    with tempfile.TemporaryDirectory(prefix="regproxy-int8-") as tmp, warnings.catch_warnings():
        # onnxruntime logs advice on pre-processing and per-channel axes of 1-D tensors it then skips: not ours to act on
        warnings.simplefilter("ignore")
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            # reduce_range (7-bit weights): the file runs on CPUs we do not know, and on those without VNNI
            # onnxruntime's int8 products saturate int16 (an MLP block off by 10% of its output range on an AVX2
            # EPYC, 2.7% with 7-bit weights)
            quantize_static(str(source), str(Path(tmp) / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, op_types_to_quantize=list(QUANTIZED_OPS))
        except (RuntimeError, ValueError) as exc:
            raise RegproxyError(f"int8 quantization of {source} failed: {str(exc).strip().splitlines()[0]}") from exc
        finally:
            logging.getLogger().setLevel(quiet)
        proto = onnx.load(str(Path(tmp) / "int8.onnx"))
    props = {META_PREFIX + key: value for key, value in {**meta, "quantization": "int8"}.items()}
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = "RegProxy semantic segmentation (Zhang et al., CVPR 2022), exported by regproxy, int8 (QDQ)"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(output, lambda tmp: onnx.save_model(proto, tmp))
    except OSError as exc:
        raise RegproxyError(f"cannot write {output}: {exc.strerror or exc}") from None
    return output


def label_agreement(reference: nn.Module, candidate: nn.Module, images: Iterable[np.ndarray]) -> float:
    """The percentage of pixels whose labels ``candidate`` and ``reference`` agree on, over all ``images``
    (each segmented with the models' own protocol by :func:`~regproxy_cli.inference.predictor.predict_labels`)."""
    equal = total = 0
    for image in images:
        a, b = predict_labels(reference, image), predict_labels(candidate, image)
        equal += int((a == b).sum())
        total += a.size
    if total == 0:
        raise RegproxyError("no images to compare the models on")
    return 100.0 * equal / total
