"""Parameter and FLOP counts, two ways, on meta tensors (no weights are allocated, so L/16 takes seconds).

* **true**: multiply-adds of every matrix product and convolution the forward pass runs: patch
  embedding / CNN stem, q/k/v and output projections, the attention products QK^T and AV, MLPs, the
  affinity head, the classifier and the painting step. Element-wise work (norms, activations,
  softmax, resizing) is left out; it is well under 1% of the total.
* **paper**: the convention behind the paper's tables, mmcv's counter on the authors' mmseg model.
  It counts conv (with bias), linear, norm (x2 when affine), ReLU and pooling modules, but not
  mmseg's ``nn.MultiheadAttention``, so nothing inside attention (projections included) and not the
  functional painting. ViT-S/16 at 512^2 is 14.9 G this way and about twice that truly.

Both are multiply-add counts (what the paper calls FLOPs); ``torch.utils.flop_counter`` reports
2 x multiply-adds. Counts inside a convolutional stem (the hybrids' ResNet) are also reported on
their own: the paper's R26+S/32 figure includes its stem, its R50+L/32 figure leaves it out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from regproxy_cli.classes import ADE20K_CLASSES, CITYSCAPES_CLASSES
from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.plugins import BackboneSpec, get_backbone, list_backbones
from regproxy_cli.model.regproxy import ProxyHead, build_model, parse_region_res

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.LeakyReLU)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass
class FlopCount:
    """Counts for one forward pass (times ``windows`` for sliding-window totals); MACs, not 2x."""

    params: int
    true_macs: int
    paper_macs: int
    stem_true_macs: int
    stem_paper_macs: int
    windows: int = 1

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _is_attention(module: nn.Module) -> bool:
    # timm's Attention and look-alikes: a fused qkv projection and a head count
    return hasattr(module, "qkv") and hasattr(module, "num_heads")


def _module_macs(module: nn.Module, inputs: tuple, output: object) -> tuple[int, int]:
    """(true, paper) multiply-adds of one module call, counting only the module's own work."""
    if isinstance(module, nn.Conv2d):
        kernel = module.in_channels // module.groups * math.prod(module.kernel_size)
        macs = output.numel() * kernel
        return macs, macs + (output.numel() if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        macs = output.numel() * module.in_features
        return macs, macs
    if isinstance(module, _NORMS):
        affine = getattr(module, "affine", getattr(module, "elementwise_affine", False))
        return 0, inputs[0].numel() * (2 if affine else 1)
    if isinstance(module, _ACTIVATIONS):
        return 0, output.numel()
    if isinstance(module, _POOLS):
        return 0, inputs[0].numel()
    if _is_attention(module):
        batch, tokens, _ = inputs[0].shape
        dim = module.qkv.out_features // 3
        return 2 * batch * tokens * tokens * dim, 0  # QK^T and AV
    if isinstance(module, ProxyHead):
        region_logits = output[0]
        return region_logits.numel() * 9, 0  # painting: 9 neighbours per output logit
    return 0, 0


def count_model(model: nn.Module, height: int, width: int) -> FlopCount:
    """Count one (1, 3, height, width) forward pass of ``model``, ideally built on the meta device."""
    device = next(model.parameters()).device
    attention_prefixes = tuple(f"{name}." for name, mod in model.named_modules() if _is_attention(mod))
    stem = getattr(getattr(model, "backbone", None), "cnn_stem", None)
    stem_modules = {id(mod) for mod in stem.modules()} if stem is not None else set()
    totals = {"true": 0, "paper": 0, "stem_true": 0, "stem_paper": 0}

    def hook(name: str, module: nn.Module, inputs: tuple, output: object) -> None:
        true, paper = _module_macs(module, inputs, output)
        if name.startswith(attention_prefixes):  # mmcv never sees inside nn.MultiheadAttention
            paper = 0
        totals["true"] += true
        totals["paper"] += paper
        if id(module) in stem_modules:
            totals["stem_true"] += true
            totals["stem_paper"] += paper

    handles = [
        mod.register_forward_hook(lambda mod, inp, out, name=name: hook(name, mod, inp, out))
        for name, mod in model.named_modules()
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, height, width, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    params = sum(p.numel() for p in model.parameters())
    return FlopCount(params, totals["true"], totals["paper"], totals["stem_true"], totals["stem_paper"])


def sliding_windows(image: tuple[int, int], window: int, stride: int) -> int:
    """Number of windows mmseg's sliding-window inference runs (windows aligned to the image end)."""
    if stride < 1:
        raise RegproxyError(f"sliding-window stride must be positive, got {stride}")
    rows = max(image[0] - window + stride - 1, 0) // stride + 1
    cols = max(image[1] - window + stride - 1, 0) // stride + 1
    return rows * cols


def count_flops(
    backbone: str | BackboneSpec,
    *,
    size: int | None = None,
    classes: int = len(ADE20K_CLASSES),
    region_res: int | str | tuple[int, int] = (4, 4),
    baseline: bool = False,
    slide_image: tuple[int, int] | None = None,
    slide_stride: int | None = None,
) -> FlopCount:
    """Count a model on a backbone at ``size``^2 (default: the backbone's paper crop).

    With ``slide_image`` the FLOPs are totals over the sliding windows (window = ``size``) covering an
    image of that (height, width), as the paper's Cityscapes table reports them.
    """
    spec = get_backbone(backbone)
    size = spec.crop_size if size is None else size
    if size < 1:
        raise RegproxyError(f"input size must be positive, got {size}")
    with torch.device("meta"):
        model = build_model(spec, classes, region_res=parse_region_res(region_res), baseline=baseline, img_size=size)
    count = count_model(model, size, size)
    if slide_image is not None:
        windows = sliding_windows(slide_image, size, size if slide_stride is None else slide_stride)
        count.true_macs *= windows
        count.paper_macs *= windows
        count.stem_true_macs *= windows
        count.stem_paper_macs *= windows
        count.windows = windows
    return count


@dataclass(frozen=True)
class PaperFigure:
    gflops: float
    mparams: float
    source: str
    note: str = ""


# (backbone, input size, classes, region (h, w), baseline, sliding-window image or None) -> paper figure
_ADE, _CITY = len(ADE20K_CLASSES), len(CITYSCAPES_CLASSES)
PAPER_FIGURES: dict[tuple, PaperFigure] = {
    ("t16", 512, _ADE, (4, 4), True, None): PaperFigure(3.8, 5.7, "Table 3"),
    ("s16", 512, _ADE, (4, 4), True, None): PaperFigure(14.9, 22.0, "Table 3"),
    ("b16", 512, _ADE, (4, 4), True, None): PaperFigure(58.8, 86.6, "Table 3"),
    ("l16", 640, _ADE, (4, 4), True, None): PaperFigure(325.0, 304.3, "Table 3"),
    ("t16", 512, _ADE, (4, 4), False, None): PaperFigure(3.9, 5.8, "Tables 3-4"),
    ("s16", 512, _ADE, (4, 4), False, None): PaperFigure(15.1, 22.2, "Table 3"),
    ("b16", 512, _ADE, (4, 4), False, None): PaperFigure(59.5, 87.3, "Table 3"),
    ("l16", 640, _ADE, (4, 4), False, None): PaperFigure(325.9, 306.1, "Table 3"),
    ("r26-s32", 512, _ADE, (4, 4), False, None): PaperFigure(16.0, 36.0, "Table 4", "paper counts the ResNet stem"),
    ("r50-l32", 640, _ADE, (4, 4), False, None): PaperFigure(
        82.0, 323.0, "Table 4", "paper leaves the ResNet stem out"
    ),
    ("t16", 768, _CITY, (4, 4), False, (1024, 2048)): PaperFigure(69.0, 6.0, "Table 5"),
    ("s16", 768, _CITY, (4, 4), False, (1024, 2048)): PaperFigure(270.0, 23.0, "Table 5"),
    ("b16", 768, _CITY, (4, 4), False, (1024, 2048)): PaperFigure(1064.0, 88.0, "Table 5"),
    ("t16", 512, _ADE, (1, 1), False, None): PaperFigure(3.9, 5.8, "Table 8"),
    ("s16", 512, _ADE, (1, 1), False, None): PaperFigure(15.1, 22.2, "Table 8"),
    ("s16", 512, _ADE, (16, 16), False, None): PaperFigure(15.9, 23.1, "Table 8"),
    ("t16", 512, _ADE, (16, 16), False, None): PaperFigure(4.3, 6.2, "Table 8"),
    ("r26-s32", 512, _ADE, (1, 1), False, None): PaperFigure(16.2, 36.3, "Table 8", "paper counts the ResNet stem"),
}


def paper_figure(
    backbone: str,
    size: int,
    classes: int,
    region_res: tuple[int, int],
    baseline: bool,
    slide_image: tuple[int, int] | None,
    windows: int,
) -> PaperFigure | None:
    """The paper's published figure for this exact setting, if it has one."""
    if slide_image is not None and windows != 8:  # Table 5 is 8 windows of 768^2 over 1024x2048
        return None
    region = (4, 4) if baseline else region_res
    return PAPER_FIGURES.get((backbone, size, classes, region, baseline, slide_image))


def flops_rows(
    backbones: list[str] | None = None,
    *,
    size: int | None = None,
    classes: int = len(ADE20K_CLASSES),
    region_res: tuple[int, int] = (4, 4),
    baseline: bool = False,
    slide_image: tuple[int, int] | None = None,
    slide_stride: int | None = None,
) -> list[dict]:
    """``regproxy flops``' rows: for each backbone (default: every installed one, in the paper's order: by stride,
    then width) its :class:`FlopCount` at ``size`` (default: its crop), beside the paper's figure when there is one."""
    specs = [get_backbone(name) for name in backbones or list_backbones()]
    if not backbones:
        specs.sort(key=lambda s: (s.stride, s.width))
    rows = []
    for spec in specs:
        crop = spec.crop_size if size is None else size
        count = count_flops(spec, size=crop, classes=classes, region_res=region_res, baseline=baseline,
                            slide_image=slide_image, slide_stride=slide_stride)
        ref = paper_figure(spec.name, crop, classes, region_res, baseline, slide_image, count.windows)
        rows.append({
            "backbone": spec.name,
            "title": spec.title,
            "model": "linear baseline" if baseline else f"RegProxy {region_res[0]}x{region_res[1]}",
            "size": crop,
            "classes": classes,
            **count.as_dict(),
            "paper": None if ref is None else {"gflops": ref.gflops, "mparams": ref.mparams, "source": ref.source,
                                               "note": ref.note},
        })
    return rows
