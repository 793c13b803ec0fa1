"""regproxy: RegProxy semantic segmentation ("Semantic Segmentation by Early Region Proxy", CVPR 2022).

The public API, gathered from the layers (see docs/development.md, "Layout"): build and load models, segment images,
declare backbones.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from regproxy_cli.constants import IMAGENET_MEAN, IMAGENET_STD, VERSION
from regproxy_cli.errors import RegproxyError

# Each name of the API and the module that defines it, imported on first use (PEP 562): `import regproxy_cli` stays
# light, so a process that needs one small piece (a Ray read task decoding images) does not pay for torch and timm.
_LAZY = {
    "load_pretrained": "regproxy_cli.hub.checkpoint",
    "save_pretrained": "regproxy_cli.hub.checkpoint",
    "push_to_hub": "regproxy_cli.hub.remote",
    "ZOO": "regproxy_cli.hub.zoo",
    "load_model": "regproxy_cli.hub.zoo",
    "predict_labels": "regproxy_cli.inference.predictor",
    "ModelConfig": "regproxy_cli.model.config",
    "affinity_from_logits": "regproxy_cli.model.ops",
    "paint": "regproxy_cli.model.ops",
    "Backbone": "regproxy_cli.model.plugins",
    "BackboneSpec": "regproxy_cli.model.plugins",
    "get_backbone": "regproxy_cli.model.plugins",
    "list_backbones": "regproxy_cli.model.plugins",
    "refresh_backbones": "regproxy_cli.model.plugins",
    "LinearBaseline": "regproxy_cli.model.regproxy",
    "ProxyOutput": "regproxy_cli.model.regproxy",
    "RegProxy": "regproxy_cli.model.regproxy",
    "build_model": "regproxy_cli.model.regproxy",
    "create_timm_vit": "regproxy_cli.model.timm_vit",
}

if TYPE_CHECKING:
    from regproxy_cli.hub.checkpoint import load_pretrained, save_pretrained
    from regproxy_cli.hub.remote import push_to_hub
    from regproxy_cli.hub.zoo import ZOO, load_model
    from regproxy_cli.inference.predictor import predict_labels
    from regproxy_cli.model.config import ModelConfig
    from regproxy_cli.model.ops import affinity_from_logits, paint
    from regproxy_cli.model.plugins import Backbone, BackboneSpec, get_backbone, list_backbones, refresh_backbones
    from regproxy_cli.model.regproxy import LinearBaseline, ProxyOutput, RegProxy, build_model
    from regproxy_cli.model.timm_vit import create_timm_vit


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'regproxy_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = VERSION

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
    "create_timm_vit",
    "get_backbone",
    "list_backbones",
    "load_model",
    "load_pretrained",
    "paint",
    "predict_labels",
    "push_to_hub",
    "refresh_backbones",
    "save_pretrained",
]
