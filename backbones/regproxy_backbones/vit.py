"""Vanilla ViT backbones with a 16x16 patch-embedding stem: Ti/16, S/16, B/16 (DeiT distilled), L/16.

Default M is the authors' ADE20K token-head depth (tap index + 1); Cityscapes models use a
shallower head (3 for Ti/S/B, 6 for L), which the model zoo sets.
"""

from functools import partial

from regproxy_cli import BackboneSpec
from regproxy_cli.model.timm_vit import create_timm_vit

VIT_TI16 = BackboneSpec(
    name="t16", title="ViT-Ti/16", stride=16, m=5, width=192, depth=12, heads=3, num_prefix_tokens=1,
    pretrained="vit_tiny_patch16_384.augreg_in21k_ft_in1k",
    factory=partial(create_timm_vit, "vit_tiny_patch16_384", stride=16),
)
VIT_S16 = BackboneSpec(
    name="s16", title="ViT-S/16", stride=16, m=5, width=384, depth=12, heads=6, num_prefix_tokens=1,
    pretrained="vit_small_patch16_384.augreg_in21k_ft_in1k",
    factory=partial(create_timm_vit, "vit_small_patch16_384", stride=16),
)
# B/16 starts from DeiT-distilled weights, so it carries a distillation token after the cls token.
VIT_B16 = BackboneSpec(
    name="b16", title="ViT-B/16", stride=16, m=5, width=768, depth=12, heads=12, num_prefix_tokens=2,
    pretrained="deit_base_distilled_patch16_384.fb_in1k",
    factory=partial(create_timm_vit, "deit_base_distilled_patch16_384", stride=16),
)
VIT_L16 = BackboneSpec(
    name="l16", title="ViT-L/16", stride=16, m=10, width=1024, depth=24, heads=16, num_prefix_tokens=1,
    pretrained="vit_large_patch16_384.augreg_in21k_ft_in1k", crop_size=640,
    factory=partial(create_timm_vit, "vit_large_patch16_384", stride=16),
)

# Not from the paper: a small ViT trained from scratch, for the offline demo on synthetic scenes (no weights to
# download). Patch 8 keeps thin structures resolvable at 128x128.
VIT_DEMO8 = BackboneSpec(
    name="demo8", title="ViT-Demo/8", stride=8, m=2, width=96, depth=4, heads=3, num_prefix_tokens=1,
    pretrained=None, crop_size=128,
    factory=partial(create_timm_vit, "vit_tiny_patch16_384", stride=8, patch_size=8, embed_dim=96, depth=4,
                    num_heads=3),
)
