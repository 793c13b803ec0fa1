"""RegProxy on DINOv3/DINOv2 against RegProxy-S/16 and EoMT-style peers on the same ViTs: 512², CPU, random weights.

EoMT (Kerssies et al., *Your ViT is Secretly an Image Segmentation Model*, CVPR 2025) is the plain-ViT segmenter
that leads with DINOv2/DINOv3 features; no package ships it for these timm models, so ``EoMTStyle`` writes out its
inference path on the same timm ViT, at the cost that matters: 100 learned queries join the tokens for the last 4
blocks (in front of them, so DINOv3's rotary embedding skips them like the prefix tokens), the final norm, a
3-layer MLP of mask embeddings, two upscaling blocks (2x2 transposed conv, 3x3 depthwise conv, LayerNorm, GELU) to
stride 4, mask logits as query-pixel dot products, a linear class head with a no-object class, and the semantic
combination (class softmax without the null class x mask sigmoid, summed over queries). Masked attention is a
training device (annealed away), so inference runs none. Labels for every contender come from the same resize +
argmax (:func:`regproxy_cli.model.resize.resize_argmax`).

    flock /tmp/regproxy-bench.lock python -m bench.dino [--size 512] [--rounds 5] [--threads N]

prints parameters, true GMACs and the median time of image -> label map per contender (interleaved rounds in one
process) and writes ``docs/dino.json`` (``--out``); docs/backbones.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from regproxy_cli.files import write_text_atomic
from regproxy_cli.model.flops import count_flops
from regproxy_cli.model.plugins import get_backbone
from regproxy_cli.model.regproxy import build_model
from regproxy_cli.model.resize import padded_size, resize_argmax

from .common import REPO, interleaved, machine, median

CLASSES = 150
QUERIES = 100  # EoMT's ADE20K semantic setting
QUERY_BLOCKS = 4  # EoMT's L2: the last blocks see the queries


class _Upscale(nn.Module):
    """EoMT's ScaleBlock: 2x transposed conv, depthwise 3x3 conv, LayerNorm over channels, GELU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.up(x))
        return F.gelu(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class EoMTStyle(nn.Module):
    """EoMT's inference path on a regproxy timm backbone (see the module docstring)."""

    def __init__(self, backbone_name: str, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.backbone = get_backbone(backbone_name).build()
        dim = self.backbone.width
        self.queries = nn.Parameter(torch.randn(QUERIES, dim) * 0.02)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(),
                                       nn.Linear(dim, dim))
        self.upscale = nn.Sequential(_Upscale(dim), _Upscale(dim))
        for block in self.backbone.vit.blocks[-QUERY_BLOCKS:]:
            if hasattr(block.attn, "num_prefix_tokens"):  # Eva: rotate only the patches, not the queries
                block.attn.num_prefix_tokens = QUERIES + self.backbone.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, 4 rows, 4 cols) semantic scores at stride / 4."""
        tokens, (rows, cols), block_args = self.backbone.embed(x)
        blocks = self.backbone.vit.blocks
        for block in blocks[:-QUERY_BLOCKS]:
            tokens = block(tokens, **block_args)
        tokens = torch.cat([self.queries.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in blocks[-QUERY_BLOCKS:]:
            tokens = block(tokens, **block_args)
        tokens = self.backbone.vit.norm(tokens)
        queries, patches = tokens[:, :QUERIES], tokens[:, QUERIES + self.backbone.num_prefix_tokens:]
        grid = self.upscale(patches.transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols))
        masks = torch.einsum("bqd,bdhw->bqhw", self.mask_head(queries), grid)
        classes = self.class_head(queries).softmax(-1)[..., :-1]
        return torch.einsum("bqk,bqhw->bkhw", classes, masks.sigmoid())

    @torch.inference_mode()
    def labels(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        padded = padded_size((height, width), self.backbone.stride)
        return torch.stack([resize_argmax(s, padded)[:height, :width] for s in self(x)])


def true_gmacs(module: nn.Module, size: int) -> float:
    """Multiply-adds of one forward (torch's counter reports 2 per multiply-add), on the meta device."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(torch.zeros(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 2 / 1e9


def contenders() -> dict[str, tuple[str, Callable[[], nn.Module]]]:
    """Label -> (what it is, a builder of a module with ``labels(x)``)."""
    return {
        "RegProxy-S/16": ("ViT-S/16 (AugReg), RegProxy 4x4", lambda: build_model("s16", CLASSES)),
        "RegProxy-DINOv3-S/16": ("DINOv3 ViT-S/16, RegProxy 4x4", lambda: build_model("dinov3-s16", CLASSES)),
        "RegProxy-DINOv2-S/14": ("DINOv2 ViT-S/14 + registers, RegProxy 4x4",
                                 lambda: build_model("dinov2-s14", CLASSES)),
        "EoMT-style DINOv3-S/16": ("DINOv3 ViT-S/16, 100 queries in the last 4 blocks", lambda: EoMTStyle("dinov3-s16")),
        "EoMT-style DINOv2-S/14": ("DINOv2 ViT-S/14, 100 queries in the last 4 blocks", lambda: EoMTStyle("dinov2-s14")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dino.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.size, args.size)
    rows, calls = {}, {}
    backbones = {"RegProxy-S/16": "s16", "RegProxy-DINOv3-S/16": "dinov3-s16", "RegProxy-DINOv2-S/14": "dinov2-s14",
                 "EoMT-style DINOv3-S/16": "dinov3-s16", "EoMT-style DINOv2-S/14": "dinov2-s14"}
    for label, (what, build) in contenders().items():
        model = build().eval()
        if label.startswith("RegProxy"):
            gmacs = count_flops(backbones[label], size=args.size, classes=CLASSES).true_macs / 1e9
        else:
            with torch.device("meta"):
                gmacs = true_gmacs(EoMTStyle(backbones[label]).eval(), args.size)
        rows[label] = {"what": what, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                       "true_gmacs": gmacs}
        calls[label] = (lambda m=model: m.labels(x))
    times = interleaved(calls, rounds=args.rounds, warmup=1)
    for label, row in rows.items():
        row["ms"] = median(times[label]) * 1000
    result = {"size": args.size, "rounds": args.rounds, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "seconds": round(time.perf_counter() - started), "rows": rows}
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(f"{args.size}^2, batch 1, fp32, image -> labels, {result['machine']['cpu']}, "
          f"{result['machine']['torch_threads']} threads")
    print("| model | params | true GMACs | ms / image |")
    print("| --- | ---: | ---: | ---: |")
    for label, row in rows.items():
        print(f"| {label} | {row['params_m']:.1f} M | {row['true_gmacs']:.1f} | {row['ms']:.0f} |")


if __name__ == "__main__":
    main()
