"""An independent port of the authors' code (mmseg 0.17 ViT + their ProxyHead) and their checkpoint layout.

Written from the reference notes on the authors' implementation, with functional torch ops only; it
shares no code with regproxy, so agreement with it checks the conversion and the model together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def authors_state_dict(*, width: int, depth: int, num_classes: int, grid: int, prefix: int, region: int = 4,
                       patch: int = 16, stem_state: dict | None = None, stem_channels: int = 2048,
                       device: str = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's ``state_dict`` in the authors' exact key layout, with random values."""
    def t(*shape):
        return torch.randn(shape, device=device) * 0.05

    sd: dict[str, torch.Tensor] = {}
    if stem_state is None:
        sd["backbone.patch_embed.projection.weight"] = t(width, 3, patch, patch)
        sd["backbone.patch_embed.projection.bias"] = t(width)
    else:
        for key, value in stem_state.items():
            sd[f"backbone.patch_embed.backbone.{key}"] = value.to(device)
        sd["backbone.patch_embed.proj.weight"] = t(width, stem_channels, 1, 1)
        sd["backbone.patch_embed.proj.bias"] = t(width)
    sd["backbone.cls_token"] = t(1, 1, width)
    if prefix == 2:
        sd["backbone.dist_token"] = t(1, 1, width)
    sd["backbone.pos_embed"] = t(1, grid * grid + prefix, width)
    for i in range(depth):
        p = f"backbone.layers.{i}."
        sd[p + "ln1.weight"], sd[p + "ln1.bias"] = 1 + t(width), t(width)
        sd[p + "attn.attn.in_proj_weight"], sd[p + "attn.attn.in_proj_bias"] = t(3 * width, width), t(3 * width)
        sd[p + "attn.attn.out_proj.weight"], sd[p + "attn.attn.out_proj.bias"] = t(width, width), t(width)
        sd[p + "ln2.weight"], sd[p + "ln2.bias"] = 1 + t(width), t(width)
        sd[p + "ffn.layers.0.0.weight"], sd[p + "ffn.layers.0.0.bias"] = t(4 * width, width), t(4 * width)
        sd[p + "ffn.layers.1.weight"], sd[p + "ffn.layers.1.bias"] = t(width, 4 * width), t(width)
    sd["backbone.ln1.weight"], sd["backbone.ln1.bias"] = 1 + t(width), t(width)
    sd["decode_head.mlp.0.0.weight"], sd["decode_head.mlp.0.0.bias"] = t(num_classes, width), t(num_classes)
    head = "decode_head.affinity_head."
    for conv, shape in (("depthwise_conv", (width, 1, 3, 3)), ("pointwise_conv", (width, width, 1, 1))):
        sd[f"{head}0.{conv}.conv.weight"] = t(*shape) * 10
        sd[f"{head}0.{conv}.bn.weight"], sd[f"{head}0.{conv}.bn.bias"] = 1 + t(width), t(width)
        sd[f"{head}0.{conv}.bn.running_mean"] = t(width)
        sd[f"{head}0.{conv}.bn.running_var"] = 1 + t(width).abs()
        sd[f"{head}0.{conv}.bn.num_batches_tracked"] = torch.tensor(1000, device=device)
    sd[f"{head}1.conv.weight"], sd[f"{head}1.conv.bias"] = t(9 * region * region, width, 1, 1) * 20, t(9 * region * region)
    return sd


def _grid(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    out = tokens[:, prefix:]
    return out.reshape(out.shape[0], h, w, out.shape[-1]).permute(0, 3, 1, 2)


def _bn(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        False, 0.0, 1e-5)


def authors_forward(sd: dict, img: torch.Tensor, *, depth: int, heads: int, tap: int, region: int = 4,
                    stem=None) -> torch.Tensor:
    """``encode_decode`` of the authors' model on a crop: (B, 3, H, W) -> (B, K, H, W) logits."""
    batch = img.shape[0]
    if stem is None:
        w = sd["backbone.patch_embed.projection.weight"]
        x = F.conv2d(img, w, sd["backbone.patch_embed.projection.bias"], stride=w.shape[-1])
    else:
        x = F.conv2d(stem(img), sd["backbone.patch_embed.proj.weight"], sd["backbone.patch_embed.proj.bias"])
    width, h, w = x.shape[1:]
    x = x.flatten(2).transpose(1, 2)
    tokens = [sd["backbone.cls_token"].expand(batch, -1, -1)]
    if "backbone.dist_token" in sd:
        tokens.append(sd["backbone.dist_token"].expand(batch, -1, -1))
    prefix = len(tokens)
    x = torch.cat(tokens + [x], dim=1) + sd["backbone.pos_embed"]  # a crop-sized input: no resize
    outs = []
    if tap == -1:
        outs.append(_grid(x, prefix, h, w))
    for i in range(depth):
        p = f"backbone.layers.{i}."
        y = F.layer_norm(x, (width,), sd[p + "ln1.weight"], sd[p + "ln1.bias"], eps=1e-6).transpose(0, 1)
        y, _ = F.multi_head_attention_forward(
            y, y, y, width, heads, sd[p + "attn.attn.in_proj_weight"], sd[p + "attn.attn.in_proj_bias"], None, None,
            False, 0.0, sd[p + "attn.attn.out_proj.weight"], sd[p + "attn.attn.out_proj.bias"], training=False,
            need_weights=False,
        )
        x = x + y.transpose(0, 1)
        y = F.layer_norm(x, (width,), sd[p + "ln2.weight"], sd[p + "ln2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "ffn.layers.0.0.weight"], sd[p + "ffn.layers.0.0.bias"])),
                     sd[p + "ffn.layers.1.weight"], sd[p + "ffn.layers.1.bias"])
        x = x + y
        if i == depth - 1:
            x = F.layer_norm(x, (width,), sd["backbone.ln1.weight"], sd["backbone.ln1.bias"], eps=1e-6)
        if i in (tap, depth - 1):
            outs.append(_grid(x, prefix, h, w))
    x_mid, x_last = outs

    head = "decode_head.affinity_head."
    a = F.conv2d(x_mid, sd[head + "0.depthwise_conv.conv.weight"], padding=1, groups=width)
    a = F.relu(_bn(a, sd, head + "0.depthwise_conv.bn."))
    a = F.relu(_bn(F.conv2d(a, sd[head + "0.pointwise_conv.conv.weight"]), sd, head + "0.pointwise_conv.bn."))
    a = F.conv2d(a, sd[head + "1.conv.weight"], sd[head + "1.conv.bias"])
    a = a.reshape(batch, 9, region, region, h, w).clone()
    a[:, :3, :, :, 0, :] = float("-inf")  # top
    a[:, -3:, :, :, -1, :] = float("-inf")  # bottom
    a[:, ::3, :, :, :, 0] = float("-inf")  # left
    a[:, 2::3, :, :, :, -1] = float("-inf")  # right
    a = a.softmax(dim=1)
    tok = F.linear(x_last.permute(0, 2, 3, 1).reshape(batch, h * w, width), sd["decode_head.mlp.0.0.weight"],
                   sd["decode_head.mlp.0.0.bias"])
    k = tok.shape[-1]
    tok = tok.reshape(batch, h, w, k).permute(0, 3, 1, 2)
    nb = F.unfold(tok, kernel_size=3, padding=1).reshape(batch, k, 9, h, w).permute(0, 3, 4, 2, 1)
    q = a.permute(0, 4, 5, 2, 3, 1).reshape(batch, h, w, region * region, 9)
    seg = (q @ nb).reshape(batch, h, w, region, region, k).permute(0, 5, 1, 3, 2, 4).reshape(batch, k, h * region, w * region)
    return F.interpolate(seg, size=img.shape[-2:], mode="bilinear", align_corners=False)


def authors_meta(*, tap: int, num_classes: int, mode: str = "slide", crop: int = 512, stride: int = 512,
                 img_scale: object = (2048, 512), where: str = "both", classes=None, palette=None) -> dict:
    """A checkpoint's ``meta`` as mmseg 0.17's training script writes it: the merged config as mmcv's
    ``Config.pretty_text`` (yapf-formatted ``dict(...)`` source), plus CLASSES and PALETTE.

    ``where`` puts the test pipeline in the top-level ``test_pipeline``, in ``data.test.pipeline``, or in both
    (as a merged config has it).
    """
    test_cfg = f"mode='{mode}'" + (f", crop_size=({crop}, {crop}), stride=({stride}, {stride})" if mode == "slide" else "")
    pipeline = f"""[
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale={img_scale!r},
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(
                type='Normalize',
                mean=[123.675, 116.28, 103.53],
                std=[58.395, 57.12, 57.375],
                to_rgb=True),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img'])
        ])
]"""
    nested = pipeline.replace("\n", "\n        ")
    text = f"""norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    pretrained=None,
    backbone=dict(
        type='VisionTransformer',
        img_size=({crop}, {crop}),
        patch_size=16,
        out_indices=[{tap}, 11],
        norm_cfg=dict(type='LN', eps=1e-06),
        interpolate_mode='bicubic'),
    decode_head=dict(
        type='ProxyHead',
        in_index=(-2, -1),
        num_classes={num_classes},
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        region_res=(4, 4)),
    train_cfg=dict(),
    test_cfg=dict({test_cfg}))
dataset_type = 'SomeDataset'
crop_size = ({crop}, {crop})
"""
    if where in ("top", "both"):
        text += f"test_pipeline = {pipeline}\n"
    if where in ("data", "both"):
        text += f"""data = dict(
    samples_per_gpu=2,
    workers_per_gpu=4,
    test=dict(
        type='SomeDataset',
        data_root='data/some',
        img_dir='images/validation',
        pipeline={nested}))
"""
    text += "log_level = 'INFO'\nload_from = None\nworkflow = [('train', 1)]\ncudnn_benchmark = True\n"
    meta = {"mmseg_version": "0.17.0+abc1234", "config": text}
    if classes is not None:
        meta["CLASSES"] = tuple(classes)
    if palette is not None:
        meta["PALETTE"] = [list(c) for c in palette]
    return meta
