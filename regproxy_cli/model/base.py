"""The contract every segmentation model here holds to: what inference, export, the demo and the pictures may ask.

A model is declared, not probed: RegProxy and the linear baseline (:mod:`~regproxy_cli.model.regproxy`) and an
exported ``.onnx`` run by onnxruntime (:mod:`~regproxy_cli.onnx.runtime`) subclass :class:`SegmentationModel` and
say what they can do in class attributes, so callers check a flag instead of ``hasattr``.
"""

from __future__ import annotations

import torch
from torch import nn

from regproxy_cli.model.config import ModelConfig


class SegmentationModel(nn.Module):
    """A normalised (B, 3, H, W) batch in, (B, K, H, W) class scores out (``forward``), with its :class:`ModelConfig`.

    Attributes:
        config: classes, palette, normalisation and the test protocol (attached by build_model / load_model).
        stride: the model pads its input to a multiple of this (1: it takes any size as it is).
        has_grid_logits: ``grid_logits(x)`` gives the scores on the token grid, before the final resize; the
            inference code then resizes once, straight to labels or probabilities.
        has_regions: ``forward_all(x)`` gives the affinities of the learned regions (RegProxy's proxy head).
        token_classifier: the classifier plugin's module, or None (an exported graph has none to reach).
    """

    config: ModelConfig
    stride: int = 1
    has_grid_logits: bool = False
    has_regions: bool = False

    @property
    def token_classifier(self) -> nn.Module | None:
        return None

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) label maps of a normalised batch: the argmax of the class scores at the input size."""
        return self(x).argmax(1)
