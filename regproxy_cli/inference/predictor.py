"""Segmenting one image with a loaded model: preprocessing from its config, then whole or sliding-window inference
and test-time augmentation (:mod:`~regproxy_cli.inference.protocol`) down to a label map at the image's size."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from regproxy_cli.errors import RegproxyError
from regproxy_cli.images import load_image
from regproxy_cli.inference.protocol import TestProtocol, network_logits, segment_labels
from regproxy_cli.inference.quantize import check_int8_model
from regproxy_cli.inference.runtime import autocast
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.model.resize import resize_argmax


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_rgb_array(image: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a path, a PIL image (any mode) or an array."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise RegproxyError(f"expected an HxWx3 uint8 RGB array, got shape {array.shape} dtype {array.dtype}")
    return array


def normalise(image: np.ndarray, config: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 3, H, W) float tensor normalised with the config's mean/std on RGB 0-255."""
    x = torch.tensor(image, dtype=torch.float32, device=device).permute(2, 0, 1)[None]  # copies: arrays may be read-only
    mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def predict_labels(
    model: nn.Module,
    image: str | os.PathLike | Image.Image | np.ndarray,
    *,
    mode: str | None = None,
    tta: bool = False,
    scale: float = 1.0,
    batch_size: int = 8,
    precision: str = "fp32",
) -> np.ndarray:
    """(H, W) int class ids for one image at its original size.

    Args:
        mode: 'whole' or 'slide' (default: the config's inference mode).
        tta: the paper's multi-scale (0.5-1.75) + flip test as mmseg 0.17 runs it: each augmentation's logits
            resized to the image's size, softmaxed, averaged (memory bounded: see ``segment_labels``).
        scale: multiplies the config's test scale (or the image size when it has none).
        batch_size: sliding windows per forward pass.
        precision: fp32, or bf16 / fp16 autocast for the network (resizing and argmax stay float32).
    """
    check_int8_model(model, precision)
    protocol = TestProtocol.from_config(model.config, mode=mode, tta=tta, scale=scale, batch_size=batch_size)
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    device = device_of(model)
    x = normalise(rgb, model.config, device)
    with autocast(device, precision):
        if tta:  # mmseg's aug_test: each augmentation's logits resized to the original size, then softmax
            return segment_labels(model, x, protocol, (height, width)).cpu().numpy()
        size = protocol.working_size(height, width)
        if protocol.mode == "whole" and size == (height, width):
            return model.labels(x)[0].cpu().numpy()  # one resize: straight from the grid logits to labels
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        logits = network_logits(model, x, protocol)[0]
    # resize to the original in row chunks: a huge photo never needs a K x H x W tensor
    return resize_argmax(logits.float(), (height, width)).cpu().numpy()
