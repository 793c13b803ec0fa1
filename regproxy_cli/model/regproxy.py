"""RegProxy: ViT tokens as proxies of learnable regions (Zhang et al., CVPR 2022), and the paper's linear baseline.

The proxy head (Sec. 4.2-4.3, Algorithm 1; authors' ``ProxyHead``):

* an affinity head on the tap grid (after M blocks): 3x3 depthwise conv -> BN -> ReLU -> 1x1 conv ->
  BN -> ReLU -> 1x1 conv to 9*h*w channels, ordered neighbour-first (channel = n*h*w + i*w + j,
  neighbour n = (dy+1)*3 + (dx+1));
* a softmax over the 9 neighbours of every sub-pixel, with neighbours outside the token grid masked
  to -inf, so each pixel's affinities sum to 1 over in-image tokens (Eq. 4);
* one linear classifier on the final (normalised) tokens (or another classifier plugin,
  :mod:`~regproxy_cli.model.classifiers`, whose C output channels are painted and then turned into K class scores);
* painting (Eq. 6): pixel logits = sum over the 3x3 neighbours of affinity x token logits, laid out
  as (H h) x (W w), then resized bilinearly to the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.base import SegmentationModel
from regproxy_cli.model.classifiers import LinearClassifier, get_classifier
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.model.ops import NEIGHBOURS, affinity_from_logits, paint
from regproxy_cli.model.plugins import BackboneSpec, get_backbone
from regproxy_cli.model.resize import padded_size, resize_and_crop, resize_argmax


class AffinityHead(nn.Sequential):
    """Predicts 9*h*w affinity logits per token from the tap grid (one depthwise-separable conv + 1x1)."""

    def __init__(self, in_dim: int, region_res: tuple[int, int]) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_dim, in_dim, 3, padding=1, groups=in_dim, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(in_dim)
        self.depthwise_act = nn.ReLU(inplace=True)
        self.pointwise = nn.Conv2d(in_dim, in_dim, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm2d(in_dim)
        self.pointwise_act = nn.ReLU(inplace=True)
        self.out = nn.Conv2d(in_dim, NEIGHBOURS * region_res[0] * region_res[1], 1)
        for conv in (self.depthwise, self.pointwise, self.out):  # mmcv ConvModule's init, as the authors had
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.out.bias)  # uniform affinities at the start


@dataclass
class ProxyOutput:
    """Everything the proxy head computes, for visualisation and analysis.

    Attributes:
        logits: (B, K, H_in, W_in) pixel logits at the input size.
        region_logits: (B, K, H*h, W*w) painted logits at output stride ``stride / h`` (padded frame).
        affinity: (B, 9, h, w, H, W) pixel-to-token affinities, summing to 1 over the 9 neighbours.
        token_logits: (B, K, H, W) class logits of each token.
        token_outputs: (B, C, H, W) what the classifier gave each token (C = K for the linear classifier).
        tokens: (B, D, H, W) the final tokens the classifier read.
    """

    logits: torch.Tensor
    region_logits: torch.Tensor
    affinity: torch.Tensor
    token_logits: torch.Tensor
    token_outputs: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


@dataclass
class TrainingOutput:
    """What a training loss may read (:mod:`regproxy_cli.engine.losses`), from ``model(x, training_output=True)``.

    Attributes:
        logits: (B, K, H_in, W_in) class scores at the input size (what ``forward`` returns).
        outputs: (B, C, H_in, W_in) the classifier's painted (or upsampled) output channels at the input size.
        tokens: (B, D, H, W) final tokens.
        token_outputs: (B, C, H, W) the classifier's output per token.
        affinity: (B, 9, h, w, H, W) RegProxy's pixel-to-token affinities; None for the linear baseline.
        stride: the token grid's stride; region_res: (h, w) sub-pixels per token ((1, 1) for the baseline).
    """

    logits: torch.Tensor
    outputs: torch.Tensor
    tokens: torch.Tensor
    token_outputs: torch.Tensor
    affinity: torch.Tensor | None
    stride: int
    region_res: tuple[int, int]


class ProxyHead(nn.Module):
    """The affinity head and the token classifier; :meth:`forward` paints token outputs onto pixels."""

    def __init__(self, tap_dim: int, region_res: tuple[int, int], make_classifier: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.region_res = region_res
        self.affinity = AffinityHead(tap_dim, region_res)
        self.classifier = make_classifier()  # built after the affinity head: a seed gives the weights it always gave

    def forward(self, tap: torch.Tensor, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (painted outputs, affinity, token outputs) for tap and final grids of the same size.

        With the linear classifier the outputs are the K class logits; another classifier's C channels are
        painted as they are and turned into class scores by ``classifier.class_scores`` afterwards.
        """
        affinity = affinity_from_logits(self.affinity(tap), self.region_res)
        token_outputs = self.classifier(final.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return paint(token_outputs, affinity), affinity, token_outputs


class Segmenter(SegmentationModel):
    """What RegProxy and the linear baseline share: a backbone, :meth:`grid_logits` and :meth:`labels`.

    Images (files, PIL, arrays) with the config's test protocol: :func:`regproxy_cli.inference.predictor.predict_labels`.
    """

    backbone: nn.Module
    has_grid_logits = True

    @property
    def stride(self) -> int:
        """The backbone's stride: inputs are padded to a multiple of it."""
        return self.backbone.stride

    def grid_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) logits aligned with the padded input, before the final resize to the input size.

        CPU inference runs a batch image by image: one image's activations stay in the caches, and a batched
        call is slower per image (S/16 at 512^2: 16% slower at batch 8; B/16 8%; Ti/16 the same; bench/run.py).
        Training (batch norm statistics) and tracing for export keep the batch whole.
        """
        if x.shape[0] > 1 and x.device.type == "cpu" and not self.training and not torch.jit.is_tracing():
            return torch.cat([self.batch_grid_logits(image) for image in x.split(1)])
        return self.batch_grid_logits(x)

    def batch_grid_logits(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`grid_logits` of the whole batch in one call; what a model implements."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, training_output: bool = False) -> torch.Tensor | TrainingOutput:
        """(B, K, H, W) class scores; with ``training_output`` what the losses read (a keyword, so DDP passes it)."""
        if training_output:
            return self.training_output(x)
        return resize_and_crop(self.grid_logits(x), self.backbone.stride, x.shape[-2:])

    def training_output(self, x: torch.Tensor) -> TrainingOutput:
        raise NotImplementedError

    @torch.inference_mode()
    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) label maps of a normalised batch: ``self(x).argmax(1)`` without full-size logits.

        The grid logits go straight to labels with :func:`~regproxy_cli.model.resize.resize_argmax`, which blends
        all K scores only at label boundaries; equal to the argmax of the forward up to float32 rounding ties.
        """
        height, width = x.shape[-2:]
        padded = padded_size((height, width), self.backbone.stride)
        return torch.stack([resize_argmax(logits, padded)[:height, :width] for logits in self.grid_logits(x)])


class RegProxy(Segmenter):
    """Backbone + proxy head. ``forward`` maps a normalised (B, 3, H, W) batch to (B, K, H, W) logits."""

    has_regions = True

    @property
    def token_classifier(self) -> nn.Module:
        """The classifier plugin's module (:mod:`~regproxy_cli.model.classifiers`)."""
        return self.head.classifier

    def __init__(self, backbone: nn.Module, num_classes: int, region_res: tuple[int, int] = (4, 4),
                 make_classifier: Callable[[], nn.Module] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.region_res = region_res
        self.head = ProxyHead(backbone.width, region_res,
                              make_classifier or (lambda: LinearClassifier(backbone.width, num_classes)))

    def forward_all(self, x: torch.Tensor) -> ProxyOutput:
        tap, final = self.backbone(x)
        painted, affinity, token_outputs = self.head(tap, final)
        scores = self.head.classifier.class_scores
        region_logits = scores(painted)
        logits = resize_and_crop(region_logits, self.backbone.stride, x.shape[-2:])
        return ProxyOutput(logits, region_logits, affinity, scores(token_outputs), token_outputs, final)

    def training_output(self, x: torch.Tensor) -> TrainingOutput:
        tap, final = self.backbone(x)
        painted, affinity, token_outputs = self.head(tap, final)
        outputs = resize_and_crop(painted, self.backbone.stride, x.shape[-2:])
        return TrainingOutput(self.head.classifier.class_scores(outputs), outputs, final, token_outputs, affinity,
                              self.backbone.stride, self.region_res)

    def batch_grid_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.classifier.class_scores(self.head(*self.backbone(x))[0])


class LinearBaseline(Segmenter):
    """The paper's baseline: a per-token linear classifier on the final grid, upsampled bilinearly."""

    @property
    def token_classifier(self) -> nn.Module:
        """The classifier plugin's module (:mod:`~regproxy_cli.model.classifiers`)."""
        return self.classifier

    def __init__(self, backbone: nn.Module, num_classes: int,
                 make_classifier: Callable[[], nn.Module] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.classifier = (make_classifier or (lambda: LinearClassifier(backbone.width, num_classes)))()

    def token_outputs(self, final: torch.Tensor) -> torch.Tensor:
        return self.classifier(final.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def batch_grid_logits(self, x: torch.Tensor) -> torch.Tensor:
        _, final = self.backbone(x)
        return self.classifier.class_scores(self.token_outputs(final))

    def training_output(self, x: torch.Tensor) -> TrainingOutput:
        _, final = self.backbone(x)
        token_outputs = self.token_outputs(final)
        outputs = resize_and_crop(token_outputs, self.backbone.stride, x.shape[-2:])
        return TrainingOutput(self.classifier.class_scores(outputs), outputs, final, token_outputs, None,
                              self.backbone.stride, (1, 1))


def parse_region_res(value: int | str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Accept 4, "4", "4x4", "2x8" or (2, 8); each side must be 1..16."""
    if isinstance(value, str):
        parts = value.lower().replace("×", "x").split("x")
        try:
            sides = tuple(int(p) for p in parts)
        except ValueError:
            raise RegproxyError(f"region resolution {value!r} is not of the form 4 or 4x4") from None
    elif isinstance(value, int):
        sides = (value,)
    else:
        sides = tuple(value)
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or not all(isinstance(s, int) and 1 <= s <= 16 for s in sides):
        raise RegproxyError(f"region resolution {value!r} must be h or hxw with h, w in 1..16")
    return sides  # type: ignore[return-value]


def build_model(
    backbone: str | BackboneSpec,
    num_classes: int,
    *,
    m: int | None = None,
    region_res: int | str | tuple[int, int] = (4, 4),
    baseline: bool = False,
    classifier: str = "linear",
    classifier_options: dict | None = None,
    img_size: int | None = None,
    pretrained: bool = False,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Build a RegProxy model (or the linear baseline) on an installed backbone.

    Args:
        backbone: a backbone name (``list_backbones()``) or a :class:`BackboneSpec`.
        num_classes: K, the number of classes.
        m: token-head depth M; defaults to the backbone's declared one.
        region_res: (h, w) sub-pixels per token, 1..16 each; output stride is stride / h.
        baseline: build the paper's linear baseline instead.
        classifier: an installed token classifier (``list_classifiers()``); the paper's is ``linear``.
        classifier_options: its options, as its spec's ``resolve_options`` returned them.
        img_size: the crop the position embeddings are stored for; defaults to the backbone's paper crop.
        pretrained: start from the backbone's ImageNet weights (downloaded through timm from the Hub).
        drop_path_rate: stochastic depth for training (the paper uses 0.1).
    """
    if num_classes < 1:
        raise RegproxyError(f"num_classes must be at least 1, got {num_classes}")
    spec = get_backbone(backbone)
    region_res = parse_region_res(region_res)
    classifier_spec = get_classifier(classifier)
    classifier_options = dict(classifier_options or {})
    body = spec.build(m=m, img_size=img_size, pretrained=pretrained, drop_path_rate=drop_path_rate)
    def make_classifier() -> nn.Module:
        return classifier_spec.factory(body.width, num_classes, classifier_options)

    model = (LinearBaseline(body, num_classes, make_classifier) if baseline
             else RegProxy(body, num_classes, region_res, make_classifier))
    model.config = ModelConfig(
        backbone=spec.name, num_classes=num_classes, m=body.m, region_res=region_res, baseline=baseline,
        classifier=classifier_spec.name, classifier_options=classifier_options, crop_size=img_size or spec.crop_size,
        test_scale=None,
    )
    return model


def build_from_config(
    config: ModelConfig, *, pretrained_backbone: bool = False, drop_path_rate: float = 0.0
) -> nn.Module:
    """An untrained model for ``config``, with the config attached as ``model.config``."""
    model = build_model(
        config.backbone, config.num_classes, m=config.m, region_res=config.region_res, baseline=config.baseline,
        classifier=config.classifier, classifier_options=config.classifier_options, img_size=config.crop_size,
        pretrained=pretrained_backbone, drop_path_rate=drop_path_rate,
    )
    model.config = config
    return model
