"""A :class:`~regproxy_cli.model.plugins.Backbone` over timm's Vision Transformers: vanilla, DeiT-distilled, hybrid,
and the self-supervised plain ViTs of 2025, DINOv2 with registers (timm ``VisionTransformer``: position embedding
over the patches only, 4 register tokens, layer scale) and DINOv3 (timm ``Eva``: rotary position embeddings and no
learned position embedding, 4 register tokens, layer scale).

Built on timm's public API (``timm.create_model``, ``timm.layers.resample_abs_pos_embed``, the model's submodules
and its ``rope`` module's ``periods``), so a timm upgrade does not break it. Plugins for other timm ViTs can reuse
:func:`create_timm_vit` as their factory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError
from timm.layers import resample_abs_pos_embed
from torch import nn

from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.attention import cpu_bf16_attention


class TimmViTBackbone(nn.Module):
    """Runs a timm ViT on any input size and returns the tap grid after ``m`` blocks and the final grid.

    Matches the authors' mmseg ViT: [cls, (dist), patches] + position embedding (bicubic-resized,
    align_corners=False, when the grid differs from the stored one), pre-norm blocks, final norm on
    the last block only. Inputs that are not a multiple of the stride are zero-padded bottom/right;
    the caller crops its output back (the authors resize instead, which shifts pixels).

    What the 2025 ViTs change is read off the timm module, not declared at call sites:

    * ``no_embed_class`` (DINOv2): the position embedding covers the patches only; it is added to them before the
      [cls, registers] tokens are put in front (timm's and DINOv2's order), and resized without its prefix rows.
    * ``rope`` (DINOv3, timm's ``Eva``): no learned position embedding, so nothing to resize at any size, in
      ``init_from`` or in an export; the rotary embedding of the (rows, cols) grid is computed in the forward
      from tensor arithmetic (:meth:`rope_embedding`), so a traced ONNX graph keeps it dynamic.
    * registers: more prefix tokens (cls, registers), dropped from both grids like the cls token.
    * layer scale: inside timm's blocks; nothing to do here.
    """

    def __init__(self, vit: nn.Module, *, m: int, stride: int) -> None:
        super().__init__()
        self.rope = getattr(vit, "rope", None)
        has_pos = getattr(vit, "pos_embed", None) is not None
        if self.rope is None and not has_pos:
            raise RegproxyError("TimmViTBackbone needs a timm ViT with a learned or a rotary position embedding")
        # rope_embedding writes out DINOv3's rope with its defaults; any other rope (EVA's, mixed, offset or
        # differently normalised grids) would be silently wrong, so it is refused
        if self.rope is not None and (has_pos or getattr(vit, "rope_mixed", False)
                                      or not hasattr(self.rope, "periods")
                                      or getattr(self.rope, "normalize_coords", "separate") != "separate"
                                      or getattr(self.rope, "grid_offset", 0.0) != 0.0
                                      or getattr(self.rope, "grid_indexing", "ij") != "ij"):
            raise RegproxyError("unsupported timm ViT: only DINOv3's axial rotary embedding (and no learned "
                                "position embedding beside it) is supported")
        self.vit = vit
        self.m = m
        self.stride = stride
        self.width = vit.embed_dim
        self.depth = len(vit.blocks)
        self.num_prefix_tokens = vit.num_prefix_tokens
        # rows of the position embedding that belong to prefix tokens (none when it covers the patches only)
        self.pos_prefix_tokens = 0 if getattr(vit, "no_embed_class", False) else self.num_prefix_tokens
        # timm creates these as None when absent; order is the token order of timm and of the authors
        self._prefix_names = [n for n in ("cls_token", "dist_token", "reg_token") if getattr(vit, n, None) is not None]
        n_prefix = sum(getattr(vit, n).shape[1] for n in self._prefix_names)
        if n_prefix != self.num_prefix_tokens:
            raise RegproxyError(f"unsupported timm ViT: {n_prefix} prefix tokens found, {self.num_prefix_tokens} declared")
        # timm's choice of fused (SDPA) attention per block, restored whenever CPU bf16 is not on
        self._attention = [(block.attn, block.attn.fused_attn) for block in vit.blocks
                           if hasattr(getattr(block, "attn", None), "fused_attn")]
        self._linears = [module for module in vit.blocks.modules() if type(module) is nn.Linear]
        self._bf16_copies: dict[tuple[int, str], tuple] = {}  # (linear, name) -> (weight, its state, bf16 copy)

    @property
    def cnn_stem(self) -> nn.Module | None:
        """The hybrids' ResNet (timm's HybridEmbed.backbone); None for a patch-embedding stem."""
        return getattr(self.vit.patch_embed, "backbone", None)

    @property
    def pos_grid(self) -> tuple[int, int] | None:
        """The (rows, cols) grid the stored position embedding is laid out for; None with rotary embeddings only."""
        if self.rope is not None:
            return None
        n = self.vit.pos_embed.shape[1] - self.pos_prefix_tokens
        rows, cols = self.vit.patch_embed.grid_size
        if rows * cols != n:
            raise RegproxyError(f"position embedding has {n} patch rows, not {rows}x{cols}")
        return rows, cols

    def resample_pos_embed(self, pos: torch.Tensor, new_grid: tuple[int, int] | list[int],
                           old_grid: tuple[int, int] | list[int]) -> torch.Tensor:
        """A position embedding of this backbone's layout moved from ``old_grid`` to ``new_grid``, prefix rows kept.

        Bicubic, align_corners=False, no antialias: the authors' resize for the paper's ViTs and DINOv2's own
        (``interpolate_antialias=False``). timm's dynamic-size forward antialiases, whose kernel has no ONNX
        export; on the stored grid, the only one training uses, the two are the same.
        """
        return resample_abs_pos_embed(pos, new_size=list(new_grid), old_size=list(old_grid),
                                      num_prefix_tokens=self.pos_prefix_tokens, interpolation="bicubic",
                                      antialias=False)

    def rope_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """DINOv3's rotary embedding of a (rows, cols) grid, (rows * cols, 2 * head_dim): [sin, cos].

        The coordinates of timm's ``RotaryEmbeddingDinoV3`` without training augmentation: token centres
        ``(i + 0.5) / rows`` mapped to [-1, 1], each axis by its own size, angles ``2 pi c / period`` laid out
        [rows' frequencies, cols' frequencies] twice (rotate-half layout). Written as tensor arithmetic on the grid
        size, not Python floats, so the ONNX tracer keeps the size symbolic; equal to ``rope.get_embed((rows, cols))``
        (tests/test_dino.py).
        """
        periods = self.rope.periods
        device = periods.device
        grid = []
        for size in (rows, cols):
            if torch.jit.is_tracing():  # a traced size stays a graph value; eager (and meta) sizes are ints
                size = torch.as_tensor(size, device=device)
            index = torch.arange(size, device=device, dtype=torch.float32)
            scale = size.to(torch.float32) if isinstance(size, torch.Tensor) else float(size)
            grid.append((index + 0.5) / scale * 2.0 - 1.0)
        coords = torch.stack(torch.meshgrid(grid[0], grid[1], indexing="ij"), dim=-1).reshape(-1, 2)
        angles = (2 * torch.pi * coords[:, :, None] / periods[None, None, :].float()).flatten(1)
        if getattr(self.rope, "rotate_half", True):
            sin, cos = torch.cat([angles.sin()] * 2, -1), torch.cat([angles.cos()] * 2, -1)
        else:
            sin, cos = angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)
        return torch.cat([sin, cos], dim=-1)

    def attention_kernel(self, height: int, width: int) -> str | None:
        """The attention kernel a forward of a (height, width) input runs in the current autocast state.

        ``sdpa`` or ``explicit`` (None for a backbone without timm attention blocks). timm picks SDPA; under CPU bf16
        autocast the kernel measured faster on this machine for this shape runs instead, since on some CPUs the
        explicit softmax(q k^T / sqrt(d)) v is faster in bf16 and on others slower (:mod:`regproxy_cli.model.attention`).
        Elsewhere (fp32, GPUs) timm's own choice stands.
        """
        if not self._attention:
            return None
        attention, timm_fused = self._attention[0]
        if _cpu_bf16(self.vit.patch_embed.proj.weight.device if hasattr(self.vit.patch_embed, "proj")
                     else next(self.vit.parameters()).device):
            tokens = -(-height // self.stride) * -(-width // self.stride) + self.num_prefix_tokens
            return cpu_bf16_attention(tokens, attention.num_heads, attention.head_dim)
        return "sdpa" if timm_fused else "explicit"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        use_sdpa = self.attention_kernel(*x.shape[-2:]) == "sdpa"
        for attention, timm_fused in self._attention:
            attention.fused_attn = timm_fused and use_sdpa
        x, (gh, gw), block_args = self.embed(x)
        tap = x
        with self._linear_weights_in_bf16(x):
            for index, block in enumerate(self.vit.blocks):
                x = block(x, **block_args)
                if index + 1 == self.m:
                    tap = x
        final = self.vit.norm(x)
        return self._to_grid(tap, gh, gw), self._to_grid(final, gh, gw)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], dict[str, torch.Tensor]]:
        """The token sequence the blocks start from, (B, prefix + rows * cols, C), its (rows, cols) grid and the
        keyword arguments every block takes (DINOv3's rotary embedding): padding to the stride, patch embedding,
        position embedding and prefix tokens. Peers built on the same ViT (bench/dino.py) start here too."""
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.stride, -width % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.vit.patch_embed(x)  # (B, gh, gw, C): timm ViTs built with dynamic_img_size emit NHWC
        batch, gh, gw, channels = x.shape
        x = x.reshape(batch, gh * gw, channels)
        prefix = [getattr(self.vit, n).expand(batch, -1, -1) for n in self._prefix_names]
        block_args: dict[str, torch.Tensor] = {}
        if self.rope is not None:
            # training-time coordinate jitter, if a rope was built with it, is timm's; otherwise our traceable form
            augmenting = self.training and getattr(self.rope, "aug_active", False)
            block_args["rope"] = (self.rope.get_embed(shape=[gh, gw]) if augmenting
                                  else self.rope_embedding(gh, gw)).to(x.dtype)
            x = torch.cat([*prefix, x], dim=1)
        else:
            pos = self.vit.pos_embed
            if (gh, gw) != self.pos_grid:
                pos = self.resample_pos_embed(pos, [gh, gw], self.pos_grid)
            if self.pos_prefix_tokens:  # the paper's ViTs: [cls, (dist), patches] + position
                x = torch.cat([*prefix, x], dim=1) + pos
            else:  # DINOv2: patches + position, then [cls, registers] in front
                x = torch.cat([*prefix, x + pos], dim=1)
        x = self.vit.pos_drop(x)
        if self.vit.patch_drop is not None:  # timm's Eva keeps None where VisionTransformer keeps an Identity
            x = self.vit.patch_drop(x)
        x = self.vit.norm_pre(x)
        return x, (gh, gw), block_args

    @contextmanager
    def _linear_weights_in_bf16(self, x: torch.Tensor) -> Iterator[None]:
        """Under CPU bf16 autocast without gradients, the blocks' linear layers read bf16 copies of their weights.

        Autocast would cast every weight to bf16 on every call (about 7% of S/16's bf16 time at 512^2); the copies
        are the same values (a round-to-nearest cast either way), so outputs are bit-identical, and the residual
        stream and LayerNorms stay float32 as under autocast. A copy is remade when its weight changed in place or
        moved; each costs half the weight's memory. Training (gradients on) and other precisions read the weights.
        """
        if torch.is_grad_enabled() or not _cpu_bf16(x.device):
            yield
            return
        swapped = []
        try:
            for index, module in enumerate(self._linears):
                for name, param in list(module._parameters.items()):
                    if param is None or param.dtype != torch.float32:
                        continue
                    state = (param._version, param.data_ptr())
                    cached = self._bf16_copies.get((index, name))
                    if cached is None or cached[0] is not param or cached[1] != state:
                        copy = nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False)
                        cached = self._bf16_copies[(index, name)] = (param, state, copy)
                    module._parameters[name] = cached[2]
                    swapped.append((module, name, param))
            yield
        finally:
            for module, name, param in swapped:
                module._parameters[name] = param

    def _to_grid(self, tokens: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        patches = tokens[:, self.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)


def _cpu_bf16(device: torch.device) -> bool:
    """Whether work on ``device`` runs under CPU bf16 autocast now."""
    return device.type == "cpu" and _cpu_autocast_dtype() == torch.bfloat16


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast is on for, or None when it is off (torch 2.4 renamed the functions)."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def create_timm_vit(
    arch: str,
    *,
    m: int,
    img_size: int,
    pretrained: str | None,
    drop_path_rate: float,
    stride: int,
    **model_args: object,
) -> TimmViTBackbone:
    """Factory for :class:`~regproxy_cli.model.plugins.BackboneSpec`: a timm ViT by architecture name.

    Args:
        arch: timm architecture (``vit_small_patch16_384``); ``pretrained`` (``arch.tag``) replaces it
            when ImageNet weights are wanted, and timm then resizes the position embedding to
            ``img_size`` on load.
        stride: the total stride of the token grid.
        model_args: overrides of timm's architecture arguments (tests use tiny widths and depths).
    """
    vit = timm.create_model(
        arch, num_classes=0, img_size=img_size, dynamic_img_size=True, drop_path_rate=drop_path_rate, **model_args
    )
    if pretrained is not None:
        vit.load_state_dict(_imagenet_state_dict(pretrained, vit, model_args))
    return TimmViTBackbone(vit, m=m, stride=stride)


def _imagenet_state_dict(pretrained: str, vit: nn.Module, model_args: dict) -> dict[str, torch.Tensor]:
    """The backbone's ImageNet weights (through timm and the Hub cache), position embeddings resized to ``vit``'s grid.

    The resize is the authors' (bicubic, align_corners=False, no antialias), not timm's antialiased one.
    """
    try:
        source = timm.create_model(pretrained, pretrained=True, num_classes=0, **model_args)
    except GatedRepoError as exc:  # before HfHubHTTPError, of which it is one
        raise RegproxyError(
            f"the weights timm/{pretrained} are gated: accept their licence at https://huggingface.co/timm/"
            f"{pretrained.split('.')[0]} (signed in), then set HF_TOKEN to a token of that account "
            f"(or run `hf auth login`)"
        ) from exc
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise RegproxyError(
            f"cannot get the pretrained weights timm/{pretrained} ({type(exc).__name__}): the Hugging Face Hub is "
            f"unreachable or offline and they are not cached; on a connected machine run "
            f"`hf download timm/{pretrained}` and copy its cache folder ({constants.HF_HUB_CACHE}) here"
        ) from exc
    state = source.state_dict()
    if getattr(source, "pos_embed", None) is not None:  # rotary embeddings (DINOv3) have nothing to resize
        num_prefix = 0 if getattr(source, "no_embed_class", False) else source.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(vit.patch_embed.grid_size),
            old_size=list(source.patch_embed.grid_size), num_prefix_tokens=num_prefix, interpolation="bicubic",
            antialias=False,
        )
    return state
