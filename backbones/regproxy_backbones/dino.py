"""The plain ViTs of 2025 as RegProxy backbones: DINOv3 ViT-S/B/L /16 and DINOv2 ViT-S/B/L /14 with registers.

This module is also the worked example of adding a modern backbone. A backbone is a :class:`BackboneSpec` (what
it declares: stride, M, width, depth, heads, prefix tokens, the timm weights it starts from, the crop its
position embedding is stored for) registered under the ``regproxy.backbones`` entry-point group in
``pyproject.toml``. Nothing else in regproxy names these backbones: the wrapper
(:class:`regproxy_cli.model.timm_vit.TimmViTBackbone`) reads what they change off the timm module itself:

* DINOv3 (timm ``Eva``) has rotary position embeddings and no learned one: nothing to resize at any input size, in
  ``model.init_from`` or in an ONNX export; the rotary embedding of each grid is computed in the forward.
* DINOv2 keeps a learned position embedding over the patches only (``no_embed_class``), stored here for the
  crop's 37x37 grid (518 = 37 x 14).
* Both put 1 cls + 4 register tokens in front of the patches (``num_prefix_tokens=5``); the wrapper drops them
  from the grids it hands to the head. Layer scale lives inside timm's blocks.
* DINOv2's patch is 14: the stride is 14, crops and sliding windows are multiples of 14 (518, 1036), and RegProxy's
  4x4 sub-pixels per token paint at an output stride of 3.5 before the bilinear resize to the input.

M (blocks before the affinity tap) is the paper's choice for a vanilla ViT of the same depth: 5 of 12 for S and B,
10 of 24 for L (the authors' ADE20K token-head depth, 12 - 5 = 7 and 24 - 10 = 14 blocks after the tap). The tap
reads mid-network features whose locality suits the 3x3 affinity head; DINO's features are at least as local at that
depth (its patch-level objective), so there is no reason to move it, and a frozen backbone keeps it comparable with
the built-ins. Cityscapes recipes use a shallower head through ``model.m``, as for the built-ins.

Weights: DINOv2's (``timm/*_reg4_dinov2.lvd142m``) are Apache-2.0; DINOv3's (``timm/*_dinov3.lvd1689m``) are under the
DINOv3 License and gated on the Hugging Face Hub: accept the licence on the model's page and set ``HF_TOKEN``.
"""

from functools import partial

from regproxy_cli import BackboneSpec
from regproxy_cli.model.timm_vit import create_timm_vit

_DINO_PREFIX = 5  # cls + 4 registers

DINOV3_S16 = BackboneSpec(
    name="dinov3-s16", title="DINOv3 ViT-S/16", stride=16, m=5, width=384, depth=12, heads=6,
    num_prefix_tokens=_DINO_PREFIX, pretrained="vit_small_patch16_dinov3.lvd1689m", crop_size=512,
    factory=partial(create_timm_vit, "vit_small_patch16_dinov3", stride=16),
)
DINOV3_B16 = BackboneSpec(
    name="dinov3-b16", title="DINOv3 ViT-B/16", stride=16, m=5, width=768, depth=12, heads=12,
    num_prefix_tokens=_DINO_PREFIX, pretrained="vit_base_patch16_dinov3.lvd1689m", crop_size=512,
    factory=partial(create_timm_vit, "vit_base_patch16_dinov3", stride=16),
)
DINOV3_L16 = BackboneSpec(
    name="dinov3-l16", title="DINOv3 ViT-L/16", stride=16, m=10, width=1024, depth=24, heads=16,
    num_prefix_tokens=_DINO_PREFIX, pretrained="vit_large_patch16_dinov3.lvd1689m", crop_size=512,
    factory=partial(create_timm_vit, "vit_large_patch16_dinov3", stride=16),
)
DINOV2_S14 = BackboneSpec(
    name="dinov2-s14", title="DINOv2 ViT-S/14 (registers)", stride=14, m=5, width=384, depth=12, heads=6,
    num_prefix_tokens=_DINO_PREFIX, pretrained="vit_small_patch14_reg4_dinov2.lvd142m", crop_size=518,
    factory=partial(create_timm_vit, "vit_small_patch14_reg4_dinov2", stride=14),
)
DINOV2_B14 = BackboneSpec(
    name="dinov2-b14", title="DINOv2 ViT-B/14 (registers)", stride=14, m=5, width=768, depth=12, heads=12,
    num_prefix_tokens=_DINO_PREFIX, pretrained="vit_base_patch14_reg4_dinov2.lvd142m", crop_size=518,
    factory=partial(create_timm_vit, "vit_base_patch14_reg4_dinov2", stride=14),
)
DINOV2_L14 = BackboneSpec(
    name="dinov2-l14", title="DINOv2 ViT-L/14 (registers)", stride=14, m=10, width=1024, depth=24, heads=16,
    num_prefix_tokens=_DINO_PREFIX, pretrained="vit_large_patch14_reg4_dinov2.lvd142m", crop_size=518,
    factory=partial(create_timm_vit, "vit_large_patch14_reg4_dinov2", stride=14),
)
