"""Peer semantic-segmentation models for the latency benchmark, built from Hugging Face ``transformers`` configs.

Every peer is built from a config object with random weights (nothing is downloaded; the Hub is never asked) and
wrapped so that, like a RegProxy model, it maps a normalised (B, 3, H, W) float tensor to (B, K, H, W) class scores
at the input size. The wrapper includes the model's own semantic post-processing, written out as the model's
``transformers`` image processor does it in ``post_process_semantic_segmentation`` (the per-class score maps it
returns before the argmax), so a timing covers everything between the normalised input and the score maps:

* ``segformer-b0`` / ``segformer-b1``: SegFormer (MiT-b0 / MiT-b1 encoder, all-MLP decoder of width 256, as in
  the ADE20K 512x512 checkpoints); logits at 1/4 resolution, bilinearly resized to the input size.
* ``upernet-swin-t``: UperNet (PPM + FPN head, 512 channels) on Swin-T, as the ``upernet-swin-tiny``
  checkpoint; the model itself resizes its 1/4-resolution logits to the input size. The training-only FCN
  auxiliary head is left out: the ``transformers`` forward runs it whenever it exists.
* ``mask2former-swin-t``: Mask2Former (100 queries, 6-layer deformable pixel decoder, 9 masked-attention decoder
  layers after the initial prediction, width 256) on Swin-T, as the ``mask2former-swin-tiny-ade-semantic``
  checkpoint. Post-processing: the 1/4-resolution mask logits are resized to 384x384 (``transformers`` hard-codes
  this size for every model), class probabilities without the null class are combined with mask sigmoids,
  sum over queries, and the (B, K, 384, 384) result is resized to the input size.
* ``eomt-s`` / ``eomt-l``: EoMT (CVPR 2025, "Your ViT is Secretly an Image Segmentation Model"): a plain ViT
  (S: 384 wide, 12 blocks, 6 heads; L: 1024, 24, 16; patch 16, 4 register tokens as DINOv2's) whose last 4
  blocks also carry 100 query tokens, a 2-step upscaler to 1/4 resolution and mask/class heads. At inference the
  masked attention is annealed away (``attn_mask_probs`` all 0, as the released checkpoints run). Post-processing as
  ``EomtImageProcessor.post_process_semantic_segmentation``: the 1/4-resolution mask logits are resized to the
  processor's size (the input size here), class probabilities without the null class are combined with mask
  sigmoids, summed over queries, and the result resized to the target (the input) size.

    python -m bench.peers [--size 512] [--classes 150] [--repeats 2]

prints parameters, true GMACs and one CPU fp32 forward time per peer.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    EomtConfig,
    EomtForUniversalSegmentation,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SwinConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.resize import resize_argmax

PEERS: dict[str, str] = {
    "segformer-b0": "SegFormer-B0: MiT-b0 encoder + all-MLP decoder (256), logits at 1/4 resized to the input",
    "segformer-b1": "SegFormer-B1: MiT-b1 encoder + all-MLP decoder (256), logits at 1/4 resized to the input",
    "upernet-swin-t": "UperNet (PPM + FPN, 512) on Swin-T, no auxiliary head, logits resized to the input",
    "mask2former-swin-t": "Mask2Former on Swin-T (100 queries, 9+1 decoder layers), semantic inference to the input",
    "eomt-s": "EoMT-S: ViT-S/16 with 100 queries in its last 4 blocks, semantic inference to the input",
    "eomt-l": "EoMT-L: ViT-L/16 with 100 queries in its last 4 blocks, semantic inference to the input",
}

# EoMT's ViT sizes (DINOv2 with registers, patch 16 as the EoMT checkpoints use): width, blocks, heads.
_EOMT = {"eomt-s": (384, 12, 6), "eomt-l": (1024, 24, 16)}

# MiT encoder widths and heads; depths are 2,2,2,2 for both and the decoder is 256 wide in both ADE checkpoints.
_MIT = {
    "segformer-b0": {"hidden_sizes": [32, 64, 160, 256], "num_attention_heads": [1, 2, 5, 8]},
    "segformer-b1": {"hidden_sizes": [64, 128, 320, 512], "num_attention_heads": [1, 2, 5, 8]},
}

# transformers' Mask2Former image processor resizes mask logits to this size before the semantic combination,
# whatever the input size.
_MASK2FORMER_MASK_SIZE = (384, 384)


def _swin_t(drop_path_rate: float) -> SwinConfig:
    # Swin-T: C = 96, depths 2-2-6-2, heads 3-6-12-24, 7x7 windows, all four stages as features.
    return SwinConfig(
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        drop_path_rate=drop_path_rate,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )


class _Peer(nn.Module):
    """A peer's forward is its scores at the input size; :meth:`labels` takes the same shortcut RegProxy's does.

    Every peer here ends with a bilinear resize of low-resolution scores to the input, so its label maps come
    from :func:`regproxy_cli.model.resize.resize_argmax` on those scores, as ``Segmenter.labels`` does for RegProxy
    and the linear baseline: the timings compare networks, not post-processing tricks.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def low_res_scores(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.low_res_scores(x), size=x.shape[-2:], mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def labels(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([resize_argmax(scores, tuple(x.shape[-2:])) for scores in self.low_res_scores(x)])


class SegformerPeer(_Peer):
    """SegFormer: logits at 1/4 of the input, bilinearly resized to the input size."""

    def low_res_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


class UperNetPeer(_Peer):
    """UperNet: the decode head's 1/4-resolution logits (what its ``transformers`` forward resizes to the input)."""

    def low_res_scores(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.backbone.forward_with_filtered_kwargs(x).feature_maps
        return self.model.decode_head(features)


class Mask2FormerPeer(_Peer):
    """Mask2Former followed by the semantic inference of its ``transformers`` image processor."""

    def low_res_scores(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        masks = F.interpolate(
            out.masks_queries_logits, size=_MASK2FORMER_MASK_SIZE, mode="bilinear", align_corners=False
        )
        classes = out.class_queries_logits.softmax(dim=-1)[..., :-1]  # drop the null ("no object") class
        return torch.einsum("bqc,bqhw->bchw", classes, masks.sigmoid())


class EomtPeer(_Peer):
    """EoMT followed by the semantic inference of its ``transformers`` image processor, at the input's size.

    The processor resizes the mask logits to its own size before combining them with the classes; for the 512x512
    ADE20K model that is the input size, so the combined scores are already at the input size and :meth:`forward`'s
    resize (and :meth:`labels`' resize-argmax) leaves their size as it is.
    """

    def low_res_scores(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        masks = F.interpolate(out.masks_queries_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        classes = out.class_queries_logits.softmax(dim=-1)[..., :-1]  # drop the null ("no object") class
        return torch.einsum("bqc,bqhw->bchw", classes, masks.sigmoid())


def build_peer(name: str, num_classes: int = 150) -> nn.Module:
    """A randomly initialised peer in eval mode: (B, 3, H, W) normalised image -> (B, num_classes, H, W) scores."""
    if name in _MIT:
        config = SegformerConfig(
            depths=[2, 2, 2, 2],
            sr_ratios=[8, 4, 2, 1],
            patch_sizes=[7, 3, 3, 3],
            strides=[4, 2, 2, 2],
            mlp_ratios=[4, 4, 4, 4],
            decoder_hidden_size=256,
            num_labels=num_classes,
            **_MIT[name],
        )
        peer: nn.Module = SegformerPeer(SegformerForSemanticSegmentation(config))
    elif name == "upernet-swin-t":
        config = UperNetConfig(
            backbone_config=_swin_t(drop_path_rate=0.3),
            hidden_size=512,
            pool_scales=[1, 2, 3, 6],
            # the checkpoint has an FCN auxiliary head on stage 3 (384 -> 256 channels); it only feeds the
            # training loss, and transformers' forward would run it at inference too, so it is not built
            use_auxiliary_head=False,
            auxiliary_in_channels=384,
            auxiliary_channels=256,
            num_labels=num_classes,
        )
        peer = UperNetPeer(UperNetForSemanticSegmentation(config))
    elif name == "mask2former-swin-t":
        config = Mask2FormerConfig(
            backbone_config=_swin_t(drop_path_rate=0.3),
            feature_size=256,
            mask_feature_size=256,
            hidden_dim=256,
            encoder_layers=6,
            encoder_feedforward_dim=1024,
            decoder_layers=10,  # the initial prediction from the query features, then 9 masked-attention layers
            dim_feedforward=2048,
            num_attention_heads=8,
            num_queries=100,
            common_stride=4,
            pre_norm=False,
            enforce_input_projection=False,
            num_labels=num_classes,
        )
        peer = Mask2FormerPeer(Mask2FormerForUniversalSegmentation(config))
    elif name in _EOMT:
        width, depth, heads = _EOMT[name]
        config = EomtConfig(
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            patch_size=16,
            image_size=512,  # the 512x512 ADE20K model; the token grid is fixed by this size
            num_register_tokens=4,
            num_blocks=4,
            num_queries=100,
            num_labels=num_classes,
        )
        eomt = EomtForUniversalSegmentation(config)
        # trained EoMT anneals its masked attention to nothing: at inference no block is masked (the paper's point,
        # and the released checkpoints' buffer); with the default 1s every query block would build masks
        eomt.attn_mask_probs.zero_()
        peer = EomtPeer(eomt)
    else:
        raise RegproxyError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")
    return peer.eval()


def param_count(module: nn.Module) -> float:
    """Parameters of ``module`` in millions."""
    return sum(p.numel() for p in module.parameters()) / 1e6


def module_macs(module: nn.Module, size: tuple[int, int] = (512, 512)) -> float:
    """True GMACs of one batch-1 forward of ``module`` at ``size`` (on its device, with real zero-filled input).

    ``FlopCounterMode`` counts matrix products (mm, addmm, bmm, baddbmm, and what matmul, linear and einsum lower
    to), convolutions and fused scaled-dot-product attention, biases excluded; it reports 2 x multiply-adds, so
    this returns half of its total. Element-wise work, normalisation, softmax, resizing and the deformable
    attention's bilinear sampling are left out, as in :mod:`regproxy_cli.model.flops`' "true" count.
    """
    device = next(module.parameters()).device
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(torch.zeros(1, 3, *size, device=device))
    return counter.get_total_flops() / 2 / 1e9


def peer_flops(name: str, size: tuple[int, int] = (512, 512), num_classes: int = 150) -> float:
    """True GMACs (multiply-adds, not 2x) of one batch-1 forward of peer ``name`` at ``size``; see :func:`module_macs`."""
    return module_macs(build_peer(name, num_classes), size)


def _main() -> None:
    parser = argparse.ArgumentParser(description="Parameters, true GMACs and a CPU fp32 forward time per peer.")
    parser.add_argument("--size", type=int, default=512, help="square input side")
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per peer (the best is shown)")
    args = parser.parse_args()
    size = (args.size, args.size)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, {args.size}^2, fp32, CPU")
    print(f"{'peer':<20} {'params (M)':>10} {'GMACs':>8} {'forward (s)':>11}  output")
    for name in PEERS:
        model = build_peer(name, args.classes)
        macs = module_macs(model, size)
        x = torch.randn(1, 3, *size)
        times = []
        with torch.inference_mode():
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = model(x)
                times.append(time.perf_counter() - start)
        finite = bool(torch.isfinite(out).all())
        shape = "x".join(map(str, out.shape))
        print(f"{name:<20} {param_count(model):>10.2f} {macs:>8.1f} {min(times):>11.2f}  {shape}, finite={finite}")


if __name__ == "__main__":
    _main()
