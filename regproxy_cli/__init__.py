"""regproxy: RegProxy semantic segmentation ("Semantic Segmentation by Early Region Proxy", CVPR 2022)."""

from regproxy_cli.checkpoint import ModelConfig, load_pretrained, push_to_hub, save_pretrained
from regproxy_cli.errors import RegproxyError
from regproxy_cli.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LinearBaseline,
    ProxyOutput,
    RegProxy,
    affinity_from_logits,
    build_model,
    paint,
)
from regproxy_cli.plugins import Backbone, BackboneSpec, get_backbone, list_backbones, refresh_backbones
from regproxy_cli.zoo import ZOO, load_model

__version__ = "0.1.0"

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ZOO",
    "Backbone",
    "BackboneSpec",
    "LinearBaseline",
    "ModelConfig",
    "ProxyOutput",
    "RegProxy",
    "RegproxyError",
    "affinity_from_logits",
    "build_model",
    "get_backbone",
    "list_backbones",
    "load_model",
    "load_pretrained",
    "paint",
    "push_to_hub",
    "refresh_backbones",
    "save_pretrained",
]
