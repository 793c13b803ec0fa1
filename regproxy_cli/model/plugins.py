"""Backbone plugins: what a backbone declares, and how installed ones are found.

A backbone is any installed distribution that exposes a :class:`BackboneSpec` under the
``regproxy.backbones`` entry-point group. The six built-ins (``backbones/`` in this repository,
distribution ``regproxy-backbones``) register exactly the way a third-party package would::

    [project.entry-points."regproxy.backbones"]
    my-vit = "my_package.module:MY_SPEC"

The module a backbone factory returns must follow :class:`Backbone`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Protocol

import torch
from torch import nn

from regproxy_cli.errors import RegproxyError

ENTRY_POINT_GROUP = "regproxy.backbones"


class Backbone(Protocol):
    """What the RegProxy model needs from a backbone module.

    ``forward(x)`` takes a normalised (B, 3, H, W) batch of any size, pads it to a multiple of
    ``stride`` itself, and returns ``(tap, final)``, both (B, C, ceil(H/stride), ceil(W/stride)):
    ``tap`` is the token grid after the first ``m`` blocks (no norm; ``m = 0`` is right after the
    stem and position embedding), ``final`` the last block's output after the final norm. Prefix
    tokens (cls, distillation, registers) are dropped from both.
    """

    stride: int
    width: int
    m: int
    cnn_stem: nn.Module | None  # a convolutional stem, reported separately by `regproxy flops`

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class BackboneFactory(Protocol):
    def __call__(
        self, *, m: int, img_size: int, pretrained: str | None, drop_path_rate: float
    ) -> nn.Module: ...


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone's declaration: its shape, its defaults and where its starting weights live.

    Attributes:
        name: the name users type (``--backbone s16``).
        title: the name the paper uses (``ViT-S/16``).
        stride: total stride of the token grid (patch size, or the CNN stem's stride).
        m: default token-head depth M, the number of blocks before the affinity tap (official tap
            index + 1); 0 taps right after the stem.
        width: token dimension D.
        depth: number of transformer blocks.
        heads: attention heads.
        num_prefix_tokens: cls (+ distillation, + registers) tokens in front of the patch tokens.
        pretrained: timm model name with tag (``vit_small_patch16_384.augreg_in21k_ft_in1k``); the
            ImageNet weights training starts from, fetched from the Hub as ``timm/<pretrained>``; None for a
            backbone that is trained from scratch.
        crop_size: the paper's ADE20K training crop for this backbone (position embeddings are stored
            for this grid).
        factory: builds the module, see :class:`BackboneFactory`.
    """

    name: str
    title: str
    stride: int
    m: int
    width: int
    depth: int
    heads: int
    num_prefix_tokens: int
    pretrained: str | None
    factory: BackboneFactory = field(repr=False, compare=False)
    crop_size: int = 512

    def build(
        self,
        *,
        m: int | None = None,
        img_size: int | None = None,
        pretrained: bool = False,
        drop_path_rate: float = 0.0,
    ) -> nn.Module:
        """Build the backbone with random weights, or the ImageNet ones when ``pretrained``."""
        m = self.m if m is None else m
        if not 0 <= m <= self.depth:
            raise RegproxyError(f"token-head depth m={m} is out of range for {self.name}: use 0..{self.depth}")
        if pretrained and self.pretrained is None:
            raise RegproxyError(f"backbone {self.name} has no pretrained weights: set pretrained to false")
        return self.factory(
            m=m,
            img_size=img_size or self.crop_size,
            pretrained=self.pretrained if pretrained else None,
            drop_path_rate=drop_path_rate,
        )


@functools.cache
def discover(group: str, what: str = "plugin") -> dict[str, tuple[str, object]]:
    """Map each name registered under the entry-point ``group`` to (distribution name, entry point).

    Used for every plugin kind (backbones here, classifiers and losses in their modules); a name registered by two
    distributions is refused rather than resolved by install order.
    """
    found: dict[str, tuple[str, object]] = {}
    for ep in entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in found and found[ep.name][0] != dist:
            raise RegproxyError(
                f"{what} name {ep.name!r} is registered twice, by {found[ep.name][0]} and {dist}: uninstall one"
            )
        found[ep.name] = (dist, ep)
    return found


def load_plugin(group: str, what: str, name: str, spec_type: type, missing_hint: str = "none") -> object:
    """Load the spec registered as ``name`` under ``group`` and check it is a ``spec_type`` declaring that name."""
    found = discover(group, what)
    if name not in found:
        available = ", ".join(sorted(found)) or missing_hint
        raise RegproxyError(f"unknown {what} {name!r}; available: {available}")
    dist, ep = found[name]
    try:
        spec = ep.load()
    except Exception as exc:  # a broken plugin must not look like a regproxy bug
        raise RegproxyError(f"{what} {name!r} from {dist} failed to load: {exc}") from exc
    if not isinstance(spec, spec_type):
        raise RegproxyError(f"{what} {name!r} from {dist} is not a {spec_type.__name__} but {type(spec).__name__}")
    if spec.name != name:
        raise RegproxyError(f"{what} entry point {name!r} from {dist} declares the name {spec.name!r}")
    return spec


def list_backbones() -> list[str]:
    """Names of all installed backbones, sorted."""
    return sorted(discover(ENTRY_POINT_GROUP, "backbone"))


def get_backbone(name: str | BackboneSpec) -> BackboneSpec:
    """Look up an installed backbone by name (a spec passes through unchanged)."""
    if isinstance(name, BackboneSpec):
        return name
    return load_plugin(ENTRY_POINT_GROUP, "backbone", name, BackboneSpec, "none (install regproxy-backbones)")


def refresh_backbones() -> None:
    """Forget discovered plugins (all kinds), e.g. after installing one into the running interpreter."""
    discover.cache_clear()
