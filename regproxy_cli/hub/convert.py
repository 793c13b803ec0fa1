"""Converting the authors' mmsegmentation checkpoints (``{'meta', 'state_dict'}``) into regproxy models.

Every key of the authors' layout is mapped to ours and shape-checked; missing or unexpected keys are
named in the error. The architecture (backbone, classes, region resolution, crop) is read off the
weights' shapes. The token-head depth M and the test protocol (inference mode, window stride, test scale)
come, in order, from the caller, the checkpoint's embedded mmseg config, or the one known model (zoo entry)
whose shapes the weights match; a protocol nobody states is an error naming the options that state it.
"""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import torch

from regproxy_cli.errors import RegproxyError, listed, unpickling_reason
from regproxy_cli.hub.checkpoint import load_state_dict_checked
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
        raise RegproxyError(f"{path}: not a readable PyTorch checkpoint ({unpickling_reason(exc)})") from None
    if not isinstance(data, dict):
        raise RegproxyError(f"{path}: expected a dict checkpoint, found {type(data).__name__}")
    state = data.get("state_dict", data)
    meta = data.get("meta") or {}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RegproxyError(f"{path}: its state_dict is not a mapping of tensors")
    return state, meta if isinstance(meta, dict) else {}


def parse_mmcv_config(text: str) -> dict:
    """The top-level assignments of an mmcv config text (``cfg.pretty_text``) as plain Python values.

    Read with ``ast`` only, never run: ``dict(k=v)`` calls, ``{...}``, lists, tuples, numbers, strings,
    True/False/None. A value built any other way (a name, another call, arithmetic) is left out.
    """
    try:
        statements = ast.parse(text).body
    except (SyntaxError, ValueError, RecursionError):
        # mmcv quotes strings as '{v}' without escaping, so one odd string breaks the whole text: parse each
        # top-level assignment (a line starting in column 0) on its own and keep the ones that parse
        chunks = re.split(r"\n(?=[A-Za-z_]\w*\s*=)", text)
        statements = []
        for chunk in chunks:
            try:
                statements += ast.parse(chunk).body
            except (SyntaxError, ValueError, RecursionError):
                continue
    config = {}
    for node in statements:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                config[node.targets[0].id] = _literal(node.value)
            except ValueError:
                continue
    return config


def _literal(node: ast.expr) -> object:
    """The value of a literal node; ValueError for anything that is not one."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return _literal_dict((kw.arg, kw.value) for kw in node.keywords if kw.arg is not None)
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):  # {**other}
            raise ValueError("not a literal")
        return _literal_dict((_literal(key), value) for key, value in zip(node.keys, node.values, strict=True))
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(item) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        value = node.operand.value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    raise ValueError("not a literal")


def _literal_dict(items) -> dict:
    """A dict of the items whose values are literals (the others are left out, not the whole dict)."""
    out = {}
    for key, value in items:
        try:
            out[key] = _literal(value)
        except ValueError:
            continue
    return out


def embedded_config(meta: dict) -> dict:
    """The merged mmseg config a checkpoint carries in ``meta['config']``, parsed ({} when there is none)."""
    text = meta.get("config")
    return parse_mmcv_config(text) if isinstance(text, str) else {}


def _section(config: object, *keys: str) -> dict:
    """``config[k1][k2]...`` when every level is a dict, else {}."""
    for key in keys:
        config = config.get(key) if isinstance(config, dict) else None
    return config if isinstance(config, dict) else {}


def tap_index_from_meta(meta: dict) -> int | None:
    """The official tap index (first of ``model.backbone.out_indices``) from the checkpoint's embedded config."""
    indices = _section(embedded_config(meta), "model", "backbone").get("out_indices")
    if isinstance(indices, (list, tuple)) and indices:
        indices = indices[0]
    return indices if isinstance(indices, int) and not isinstance(indices, bool) else None


def _square(value: object) -> int | None:
    """N from ``N`` or ``(N, N)``; None for anything else (regproxy slides square windows only)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def protocol_from_meta(meta: dict) -> dict:
    """The ModelConfig fields a checkpoint's embedded mmseg config states: M and the test protocol.

    Only what is stated is returned: ``m`` (from ``out_indices``), ``inference_mode``, ``crop_size`` and
    ``window_stride`` (from ``model.test_cfg``), ``test_scale`` (the test pipeline's ``MultiScaleFlipAug``
    ``img_scale`` as (long, short); None when it tests at the input size).
    """
    config = embedded_config(meta)
    fields: dict = {}
    tap = tap_index_from_meta(meta)
    if tap is not None:
        fields["m"] = tap + 1
    test_cfg = _section(config, "model", "test_cfg")
    if test_cfg.get("mode") in ("slide", "whole"):
        fields["inference_mode"] = test_cfg["mode"]
    if test_cfg.get("mode") == "slide":
        crop, stride = _square(test_cfg.get("crop_size")), _square(test_cfg.get("stride"))
        if crop is not None:
            fields["crop_size"] = crop
        if stride is not None:
            fields["window_stride"] = stride
    # the test set's own pipeline is what mmseg ran; the top-level `test_pipeline` is usually the same list
    pipeline = _section(config, "data", "test").get("pipeline") or config.get("test_pipeline")
    for step in pipeline if isinstance(pipeline, list) else []:
        if not (isinstance(step, dict) and step.get("type") == "MultiScaleFlipAug" and "img_scale" in step):
            continue
        transforms = step.get("transforms") if isinstance(step.get("transforms"), list) else []
        if any(isinstance(t, dict) and t.get("type") == "Resize" and t.get("keep_ratio") is False for t in transforms):
            break  # a resize to an exact size: regproxy's test scale is a keep-ratio bound, so leave it unstated
        scale = step["img_scale"]
        if isinstance(scale, list) and len(scale) == 1:
            scale = scale[0]
        if scale is None:
            fields["test_scale"] = None
        elif isinstance(scale, tuple) and len(scale) == 2 and all(isinstance(v, int) and v > 0 for v in scale):
            fields["test_scale"] = (max(scale), min(scale))  # mmseg's keep-ratio bound ignores the order
        break
    return fields


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


# the ModelConfig fields of a test protocol, and the `regproxy convert` option that states each
PROTOCOL_OPTIONS = {"inference_mode": "--mode whole|slide", "test_scale": "--test-scale LONGxSHORT",
                    "window_stride": "--window-stride N"}


class UnknownProtocolError(RegproxyError):
    """Neither the caller, the checkpoint nor a known model states the test protocol; ``options`` would."""

    def __init__(self, path: str | Path, reason: str, options: list[str]) -> None:
        self.path, self.reason, self.options = str(path), reason, options
        super().__init__(f"{path}: {reason}: pass {' '.join(options)} (or --zoo NAME)")


def _missing_protocol(fields: dict) -> list[str]:
    missing = [k for k in ("inference_mode", "test_scale") if k not in fields]
    if fields.get("inference_mode", "slide") == "slide" and fields.get("window_stride") is None:
        missing.append("window_stride")
    return missing


def _matching(fields: dict, known: dict[str, ModelConfig]) -> list[str]:
    """Names of the known configs with the architecture the weights have."""
    keys = ("backbone", "num_classes", "crop_size", "region_res")
    return [name for name, config in known.items() if all(getattr(config, k) == fields[k] for k in keys)]


def convert_authors_checkpoint(path: str | Path, config: ModelConfig | None = None, *,
                               known: dict[str, ModelConfig] | None = None, **overrides) -> torch.nn.Module:
    """Load an authors' checkpoint into a regproxy model (eval mode, ``model.config`` set).

    Args:
        path: the ``.pth`` file from the authors' release.
        config: the full model config (e.g. a zoo entry's); checked against the weights. Without it the
            architecture is inferred from the weights, and M and the test protocol come from ``overrides``,
            else the embedded mmseg config, else the one ``known`` config with the weights' architecture.
        known: configs of known models by name (the zoo), used when the checkpoint does not state its protocol.
        overrides: ModelConfig fields to set when inferring (``backbone``, ``m``, ``test_scale``, ...); None = unset.

    Raises:
        UnknownProtocolError: nothing states the inference mode, test scale or window stride.
    """
    state, meta = read_authors_checkpoint(path)
    inferred = infer_config(state, where=str(path))
    if config is None:
        given = {k: v for k, v in overrides.items() if v is not None}
        stated = protocol_from_meta(meta)
        fields = {**inferred, **stated, **given}
        source = f"converted from the authors' checkpoint {Path(path).name}"
        missing = _missing_protocol(fields)
        if missing:
            # no embedded config (or an incomplete one): the zoo entry whose shapes these are says how it is tested
            matches = _matching({**inferred, **given}, known or {})
            if len(matches) != 1:
                said = ("its embedded mmseg config lacks the test protocol" if isinstance(meta.get("config"), str)
                        else "it carries no mmseg config")
                why = f"match several zoo models ({', '.join(matches)})" if matches else "match no zoo model"
                raise UnknownProtocolError(path, f"{said} and its shapes {why}", [PROTOCOL_OPTIONS[k] for k in missing])
            entry = known[matches[0]]
            from_entry = {k: getattr(entry, k) for k in ("m", "classes", "palette", "dataset", "inference_mode",
                                                         "window_stride", "test_scale")}
            fields = {**from_entry, **fields}
            source += f", tested as {matches[0]}"
        if "m" not in fields:
            fields["m"] = get_backbone(fields["backbone"]).m
        meta_classes = meta.get("CLASSES")
        if "classes" not in given and isinstance(meta_classes, (list, tuple)) and len(meta_classes) == fields["num_classes"]:
            fields["classes"] = [str(c) for c in meta_classes]
        meta_palette = meta.get("PALETTE")
        if "palette" not in given and isinstance(meta_palette, (list, tuple)) and len(meta_palette) == fields["num_classes"]:
            fields["palette"] = [[int(v) for v in c] for c in meta_palette]
        fields.setdefault("source", source)
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
