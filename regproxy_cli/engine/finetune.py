"""Fine-tuning: start a run from another model (``model.init_from``) and freeze part of it (``model.freeze``).

``init_from`` takes anything ``--model`` takes. Every tensor of the new model whose name and shape match the
source's is copied bit for bit; a position embedding stored for another crop is resized (bicubic, as the
backbones resize theirs, prefix tokens kept as they are); the classifier keeps the rows of the classes whose
names match (case, spaces, ``_`` and ``-`` do not matter), moved to their new index, and the other rows keep
the fresh initialisation. A different backbone, head depth M or model type (RegProxy / linear baseline) is an
error: the tensors would have the same names and mean something else.

``freeze`` takes parameters out of training: ``backbone`` all of the backbone, ``blocks:N`` the patch embedding
(and a hybrid's CNN stem), the prefix tokens, the position embedding and the first N transformer blocks.
Frozen parameters are left out of the optimiser, and the modules made only of frozen parameters stay in eval
mode during training, so batch-norm statistics (hybrid stems) do not move and drop path is off there.

What a frozen part costs: nothing backward. Autograd records an operation only when one of its inputs requires a
gradient; the image does not, and a frozen parameter does not, so no graph is built through the frozen blocks and
their activations are freed as the forward goes (measured by ``python -m bench.frozen``). ``backbone`` is the
frozen-features recipe of DINOv2/DINOv3 (their linear probe): the whole ViT frozen, RegProxy's affinity head and
token classifier trained on the tap and final tokens. ``blocks:M`` freezes exactly the blocks before the tap, so
the token head (the blocks after it, and the final norm) trains with the proxy head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from rich.table import Table
from timm.layers import resample_abs_pos_embed
from torch import nn

from regproxy_cli.errors import RegproxyError, listed
from regproxy_cli.hub.zoo import load_model


def class_key(name: str) -> str:
    """A class name for matching: lower case, runs of spaces, ``_`` and ``-`` as one space ("Traffic_Sign" ->
    "traffic sign")."""
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def classifier_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the token classifier: RegProxy's ``head.classifier``, the baseline's ``classifier``."""
    return "classifier" if model.config.baseline else "head.classifier"


def load_init_source(spec: str, *, backbone: str, m: int, baseline: bool) -> nn.Module:
    """The model ``model.init_from`` names, checked against the one being trained; errors are one line naming it."""
    try:
        source = load_model(spec)
    except RegproxyError as exc:
        message = str(exc)
        raise RegproxyError(f"model.init_from: {message}" if spec in message
                            else f"model.init_from {spec}: {message}") from None
    config = source.config
    if not source.has_grid_logits or not source.state_dict():
        raise RegproxyError(f"model.init_from {spec}: not a PyTorch regproxy model (an exported .onnx has no "
                            "trainable weights); give the model directory or .pth it was exported from")
    mismatch = []
    if config.backbone != backbone:
        mismatch.append(f"backbone {config.backbone}, the config's model.backbone is {backbone}")
    if config.baseline != baseline:
        kinds = ("the linear baseline", "RegProxy")
        mismatch.append(f"it is {kinds[not config.baseline]}, the config trains {kinds[not baseline]}")
    elif not baseline and config.m != m:
        mismatch.append(f"head depth M = {config.m}, the config's is {m} (set model.m={config.m})")
    if mismatch:
        raise RegproxyError(f"model.init_from {spec} does not fit: {'; '.join(mismatch)}")
    return source


@dataclass
class InitReport:
    """What :func:`init_from` did, tensor by tensor and class by class."""

    source: str
    loaded: list[str] = field(default_factory=list)
    resized: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    reinitialised: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    kept_classes: list[tuple[str, int, int]] = field(default_factory=list)  # (new name, source index, new index)
    new_classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "source": self.source, "loaded": self.loaded,
            "resized": [{"name": n, "from": list(a), "to": list(b)} for n, a, b in self.resized],
            "reinitialised": [{"name": n, "why": why} for n, why in self.reinitialised],
            "kept_classes": [{"name": n, "from": i, "to": j} for n, i, j in self.kept_classes],
            "new_classes": self.new_classes,
        }

    def table(self) -> Table:
        """A summary for the terminal: tensors loaded (by module), resized and re-initialised, and the classes."""
        table = Table(title=f"initialised from {self.source}", title_justify="left")
        table.add_column("what")
        table.add_column("tensors", justify="right")
        table.add_column("details", overflow="fold")
        groups: dict[str, int] = {}
        for name in self.loaded:
            group = ".".join(name.split(".")[:2])
            groups[group] = groups.get(group, 0) + 1
        table.add_row("loaded", str(len(self.loaded)), ", ".join(f"{g} ({n})" for g, n in groups.items()))
        if self.resized:
            table.add_row("resized", str(len(self.resized)),
                          "; ".join(f"{n} {tuple(a)} -> {tuple(b)}" for n, a, b in self.resized))
        if self.reinitialised:
            table.add_row("re-initialised", str(len(self.reinitialised)),
                          listed([f"{n} ({why})" for n, why in self.reinitialised], 6, "; "))
        moved = [f"{name} {i}->{j}" if i != j else name for name, i, j in self.kept_classes]
        table.add_row("classes kept", str(len(self.kept_classes)), listed(moved, 12) or "none")
        if self.new_classes:
            table.add_row("classes new", str(len(self.new_classes)), listed(self.new_classes, 12))
        return table


@torch.no_grad()
def init_from(model: nn.Module, source: nn.Module, spec: str) -> InitReport:
    """Copy what fits from ``source`` into ``model`` (freshly built, so what does not fit keeps its initialisation)."""
    report = InitReport(source=spec)
    target_state, source_state = model.state_dict(), source.state_dict()
    classifier = classifier_prefix(model)
    # linear classifiers keep rows by class name; other classifier plugins load like any tensor (if they fit)
    by_rows = all(getattr(m.config, "classifier", "linear") == "linear" for m in (model, source))
    pos_names = {name for name in target_state if name.endswith("pos_embed")}
    for name, tensor in target_state.items():
        if by_rows and name.startswith(f"{classifier}."):
            continue  # row by row, below
        if name not in source_state:
            report.reinitialised.append((name, "not in the source"))
            continue
        value = source_state[name]
        if value.shape == tensor.shape:
            tensor.copy_(value)
            report.loaded.append(name)
        elif name in pos_names and value.dim() == 3 and value.shape[2] == tensor.shape[2]:
            tensor.copy_(_resized_pos_embed(value, source.backbone, model.backbone))
            report.resized.append((name, tuple(value.shape), tuple(tensor.shape)))
        else:
            report.reinitialised.append((name, f"shape {tuple(value.shape)} != {tuple(tensor.shape)}"))

    if not by_rows:
        return report
    source_index: dict[str, int] = {}
    for index, name in enumerate(source.config.classes):
        source_index.setdefault(class_key(name), index)
    weight, bias = target_state[f"{classifier}.weight"], target_state[f"{classifier}.bias"]
    source_weight, source_bias = source_state[f"{classifier}.weight"], source_state[f"{classifier}.bias"]
    for index, name in enumerate(model.config.classes):
        found = source_index.get(class_key(name))
        if found is None:
            report.new_classes.append(name)
            continue
        weight[index].copy_(source_weight[found])
        bias[index].copy_(source_bias[found])
        report.kept_classes.append((name, found, index))
    return report


def _resized_pos_embed(value: torch.Tensor, source_backbone: nn.Module, target_backbone: nn.Module) -> torch.Tensor:
    """A position embedding laid out for the source's grid, resampled to the target's (prefix rows untouched).

    The backbone resizes it as its own forward does (``resample_pos_embed``: prefix rows, if its layout has them,
    kept); a backbone with rotary embeddings only (DINOv3) has no ``pos_embed`` and never gets here.
    """
    prefix = target_backbone.num_prefix_tokens
    if source_backbone.num_prefix_tokens != prefix:
        raise RegproxyError(f"model.init_from: {source_backbone.num_prefix_tokens} prefix tokens in the source, "
                            f"{prefix} in the model")
    if hasattr(target_backbone, "resample_pos_embed"):
        return target_backbone.resample_pos_embed(value, target_backbone.pos_grid, source_backbone.pos_grid)
    return resample_abs_pos_embed(value, new_size=list(target_backbone.pos_grid),
                                  old_size=list(source_backbone.pos_grid), num_prefix_tokens=prefix,
                                  interpolation="bicubic", antialias=False)


def apply_freeze(model: nn.Module, spec: str) -> list[str]:
    """Set ``requires_grad=False`` on what ``model.freeze`` names (``none``, ``backbone``, ``blocks:N``); the names."""
    if spec == "none":
        return []
    backbone = model.backbone
    if spec == "backbone":
        frozen = list(backbone.parameters())
    else:
        count = int(spec.split(":", 1)[1])
        vit = getattr(backbone, "vit", None)
        blocks = getattr(vit, "blocks", None)
        if blocks is None:
            raise RegproxyError(f"model.freeze {spec}: the backbone has no transformer blocks to count; use backbone")
        if count > len(blocks):
            raise RegproxyError(f"model.freeze {spec}: the backbone has only {len(blocks)} blocks")
        trainable = {id(p) for block in blocks[count:] for p in block.parameters()}
        trainable |= {id(p) for p in vit.norm.parameters()}  # the final norm feeds the classifier: it trains
        frozen = [p for p in backbone.parameters() if id(p) not in trainable]
    for parameter in frozen:
        parameter.requires_grad_(False)
    ids = {id(p) for p in frozen}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The largest submodules whose parameters are all frozen (kept in eval mode while the rest trains)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        parameters = list(module.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            found.append(module)
            inside |= {id(m) for m in module.modules()}
    return found


def train_mode(net: nn.Module, frozen: list[nn.Module]) -> None:
    """``net.train()``, with the frozen modules back in eval mode."""
    net.train()
    for module in frozen:
        module.eval()
