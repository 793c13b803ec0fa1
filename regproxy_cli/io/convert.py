"""Converting the authors' mmsegmentation checkpoints (``{'meta', 'state_dict'}``) into regproxy models.

Every key of the authors' layout is mapped to ours and shape-checked; missing or unexpected keys are
named in the error. The architecture (backbone, classes, region resolution, crop) is read off the
weights' shapes; the token-head depth M from the checkpoint's embedded config (``out_indices``) when it
is there, else from the zoo entry or the caller.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from regproxy_cli.errors import RegproxyError, listed
from regproxy_cli.io.checkpoint import load_state_dict_checked
from regproxy_cli.model.config import ModelConfig
from regproxy_cli.model.plugins import get_backbone, list_backbones
from regproxy_cli.model.regproxy import build_from_config

# (authors' pattern, ours); applied in order, first match wins
_RULES: list[tuple[str, str]] = [
    (r"^backbone\.patch_embed\.projection\.", "backbone.vit.patch_embed.proj."),
    (r"^backbone\.patch_embed\.backbone\.", "backbone.vit.patch_embed.backbone."),
    (r"^backbone\.patch_embed\.proj\.", "backbone.vit.patch_embed.proj."),
    (r"^backbone\.(cls_token|dist_token|pos_embed)$", r"backbone.vit.\1"),
    (r"^backbone\.layers\.(\d+)\.ln1\.", r"backbone.vit.blocks.\1.norm1."),
    (r"^backbone\.layers\.(\d+)\.ln2\.", r"backbone.vit.blocks.\1.norm2."),
    (r"^backbone\.layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$", r"backbone.vit.blocks.\1.attn.qkv.\2"),
    (r"^backbone\.layers\.(\d+)\.attn\.attn\.out_proj\.", r"backbone.vit.blocks.\1.attn.proj."),
    (r"^backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"backbone.vit.blocks.\1.mlp.fc1."),
    (r"^backbone\.layers\.(\d+)\.ffn\.layers\.1\.", r"backbone.vit.blocks.\1.mlp.fc2."),
    (r"^backbone\.ln1\.", "backbone.vit.norm."),
    (r"^decode_head\.mlp\.0\.0\.", "head.classifier."),
    (r"^decode_head\.affinity_head\.0\.depthwise_conv\.conv\.", "head.affinity.depthwise."),
    (r"^decode_head\.affinity_head\.0\.depthwise_conv\.bn\.", "head.affinity.depthwise_bn."),
    (r"^decode_head\.affinity_head\.0\.pointwise_conv\.conv\.", "head.affinity.pointwise."),
    (r"^decode_head\.affinity_head\.0\.pointwise_conv\.bn\.", "head.affinity.pointwise_bn."),
    (r"^decode_head\.affinity_head\.1\.conv\.", "head.affinity.out."),
]
_RULES_COMPILED = [(re.compile(p), r) for p, r in _RULES]


def map_authors_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key of an authors' state dict to ours; unknown keys are an error that names them."""
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, replacement in _RULES_COMPILED:
            if pattern.search(key):
                out[pattern.sub(replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise RegproxyError(f"not an authors' RegProxy checkpoint: unexpected keys {listed(unknown)}")
    return out


def read_authors_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of an mmseg checkpoint file, read without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise RegproxyError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise RegproxyError(f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(data, dict):
        raise RegproxyError(f"{path}: expected a dict checkpoint, found {type(data).__name__}")
    state = data.get("state_dict", data)
    meta = data.get("meta") or {}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RegproxyError(f"{path}: its state_dict is not a mapping of tensors")
    return state, meta if isinstance(meta, dict) else {}


def tap_index_from_meta(meta: dict) -> int | None:
    """The official tap index (first of ``out_indices``) from the config text mmseg embeds in ``meta``."""
    text = meta.get("config")
    if not isinstance(text, str):
        return None
    found = re.search(r"out_indices\s*=\s*[\[(]\s*(-?\d+)\s*,", text)
    return int(found.group(1)) if found else None


def infer_config(state: dict[str, torch.Tensor], *, where: str = "checkpoint") -> dict:
    """Backbone, classes, region resolution and crop read off the shapes of an authors' state dict."""
    try:
        width = state["backbone.cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("backbone.layers."))
        num_classes = state["decode_head.mlp.0.0.weight"].shape[0]
        sub = state["decode_head.affinity_head.1.conv.weight"].shape[0] // 9
        pos_rows = state["backbone.pos_embed"].shape[1]
    except (KeyError, ValueError) as exc:
        raise RegproxyError(f"{where}: not an authors' RegProxy checkpoint (no {exc})") from None
    hybrid = any(k.startswith("backbone.patch_embed.backbone.") for k in state)
    prefix = 2 if "backbone.dist_token" in state else 1
    side = round(sub ** 0.5)
    candidates = []
    for name in list_backbones():
        spec = get_backbone(name)
        if (spec.width, spec.depth, spec.num_prefix_tokens, spec.stride == 32) == (width, depth, prefix, hybrid):
            candidates.append(spec)
    if len(candidates) != 1:
        found = ", ".join(s.name for s in candidates) or "none"
        raise RegproxyError(
            f"{where}: cannot tell the backbone (width {width}, depth {depth}, {prefix} prefix tokens, "
            f"{'hybrid' if hybrid else 'patch embedding'}): installed matches: {found}; pass --backbone"
        )
    spec = candidates[0]
    grid = round((pos_rows - prefix) ** 0.5)
    if side * side != sub or grid * grid != pos_rows - prefix:
        raise RegproxyError(f"{where}: non-square region resolution or position grid is not supported")
    return {"backbone": spec.name, "num_classes": num_classes, "region_res": (side, side),
            "crop_size": grid * spec.stride}


def convert_authors_checkpoint(path: str | Path, config: ModelConfig | None = None, **overrides) -> torch.nn.Module:
    """Load an authors' checkpoint into a regproxy model (eval mode, ``model.config`` set).

    Args:
        path: the ``.pth`` file from the authors' release.
        config: the full model config (e.g. a zoo entry's); checked against the weights. Without it the
            config is inferred from the weights and their embedded mmseg config.
        overrides: ModelConfig fields to set when inferring (``backbone``, ``m``, ``classes``, ...).
    """
    state, meta = read_authors_checkpoint(path)
    inferred = infer_config(state, where=str(path))
    if config is None:
        fields = {**inferred, **{k: v for k, v in overrides.items() if v is not None}}
        if "m" not in fields:
            tap = tap_index_from_meta(meta)
            fields["m"] = get_backbone(fields["backbone"]).m if tap is None else tap + 1
        meta_classes = meta.get("CLASSES")
        if "classes" not in fields and isinstance(meta_classes, (list, tuple)) and len(meta_classes) == fields["num_classes"]:
            fields["classes"] = [str(c) for c in meta_classes]
        meta_palette = meta.get("PALETTE")
        if "palette" not in fields and isinstance(meta_palette, (list, tuple)) and len(meta_palette) == fields["num_classes"]:
            fields["palette"] = [[int(v) for v in c] for c in meta_palette]
        fields.setdefault("source", f"converted from the authors' checkpoint {Path(path).name}")
        config = ModelConfig(**fields)
    mismatched = [f"{k}: weights say {v}, config says {getattr(config, k)}" for k, v in inferred.items()
                  if k != "backbone" and getattr(config, k) != v]
    if mismatched:
        raise RegproxyError(f"{path}: {'; '.join(mismatched)}")
    with torch.device("meta"):
        model = build_from_config(config)
    load_state_dict_checked(model, map_authors_keys(state), str(path))
    model.config = config
    return model.eval()
