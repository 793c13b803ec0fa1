"""regproxy: RegProxy semantic segmentation ("Semantic Segmentation by Early Region Proxy", CVPR 2022).

The public API, gathered from the layers (see docs/development.md, "Layout"): build and load models, segment images,
declare backbones.
"""

from regproxy_cli.constants import IMAGENET_MEAN, IMAGENET_STD, VERSION
from regproxy_cli.errors import RegproxyError
from regproxy_cli.hub.checkpoint import load_pretrained, save_pretrained
from regproxy_cli.hub.remote import push_to_hub
from regproxy_cli.hub.zoo import ZOO, load_model
from regproxy_cli.inference.predictor import predict_labels
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.model.ops import affinity_from_logits, paint
from regproxy_cli.model.plugins import Backbone, BackboneSpec, get_backbone, list_backbones, refresh_backbones
from regproxy_cli.model.regproxy import LinearBaseline, ProxyOutput, RegProxy, build_model
from regproxy_cli.model.timm_vit import create_timm_vit

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
