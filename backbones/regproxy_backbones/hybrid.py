"""Hybrid ViT backbones with a ResNetV2 stem of stride 32: R26+ViT-S/32 and R50+ViT-L/32.

timm's ResNetV2 (StdConv2dSame, GroupNorm 32, TF-"SAME" padding) has the same keys and output as
the stem the authors used. M = 0: the affinity head reads the tokens right after the stem.
"""

from functools import partial

from regproxy_cli import BackboneSpec
from regproxy_cli.model.timm_vit import create_timm_vit

R26_VIT_S32 = BackboneSpec(
    name="r26-s32", title="R26+ViT-S/32", stride=32, m=0, width=384, depth=12, heads=6, num_prefix_tokens=1,
    pretrained="vit_small_r26_s32_384.augreg_in21k_ft_in1k",
    factory=partial(create_timm_vit, "vit_small_r26_s32_384", stride=32),
)
R50_VIT_L32 = BackboneSpec(
    name="r50-l32", title="R50+ViT-L/32", stride=32, m=0, width=1024, depth=24, heads=16, num_prefix_tokens=1,
    pretrained="vit_large_r50_s32_384.augreg_in21k_ft_in1k", crop_size=640,
    factory=partial(create_timm_vit, "vit_large_r50_s32_384", stride=32),
)
