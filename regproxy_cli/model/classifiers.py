"""Token classifier plugins: what labels each token before its output is painted onto pixels.

Painting (Eq. 6) is a convex blend of token vectors and works for any number of channels, so a token may output
more than one score per class: the HSSN classifier outputs leaf and superclass scores, the ProtoSeg one prototype
similarities reduced to class scores. A classifier is any installed distribution exposing a
:class:`ClassifierSpec` under the ``regproxy.classifiers`` entry-point group; the built-ins (``linear``, ``hssn``,
``protoseg``) register through this package's own ``pyproject.toml`` exactly as a third party would::

    [project.entry-points."regproxy.classifiers"]
    my-head = "my_package.module:MY_CLASSIFIER"

The module a factory returns must follow :class:`TokenClassifier`. The model config records the classifier's name
and its resolved options (``config.json``: ``classifier``, ``classifier_options``), so ``load_model`` rebuilds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.plugins import discover, load_plugin

CLASSIFIER_GROUP = "regproxy.classifiers"


class TokenClassifier(Protocol):
    """What the model needs from a token classifier module.

    ``forward(tokens)`` maps channels-last (..., D) token vectors to (..., C) token outputs, the channels that are
    painted; ``class_scores(outputs)`` maps channels-first (B, C, ...) painted (or token) outputs to (B, K, ...)
    class scores whose arg-max is the label. Both must be pointwise over positions.

    Optional, for the tools that use them: ``levels()`` (coarser label levels, HSSN: ``category``; read by
    :func:`label_levels`) and ``nearest_prototype(tokens)`` (each token's prototype, ProtoSeg; ``--regions-by
    prototype``).
    """

    out_channels: int

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def class_scores(self, outputs: torch.Tensor) -> torch.Tensor: ...


def _no_options(options: dict, classes: list[str]) -> dict:
    if options:
        raise RegproxyError(f"this classifier takes no options, got {', '.join(sorted(options))}")
    return {}


@dataclass(frozen=True)
class ClassifierSpec:
    """A classifier's declaration.

    Attributes:
        name: what ``model.classifier`` says.
        title: a line for listings.
        factory: ``factory(width, num_classes, options)`` builds the module from the token width D, K and the
            resolved options.
        resolve_options: ``resolve_options(options, classes)`` validates the YAML's ``model.classifier_options``
            against the dataset's class names and returns what the checkpoint records (e.g. a hierarchy file
            read into a mapping, so that a model directory rebuilds without the file).
    """

    name: str
    title: str
    factory: Callable[[int, int, dict], nn.Module] = field(repr=False, compare=False)
    resolve_options: Callable[[dict, list[str]], dict] = field(default=_no_options, repr=False, compare=False)


class LinearClassifier(nn.Linear):
    """The paper's classifier: one linear layer, K logits per token (state-dict keys ``weight``, ``bias``)."""

    def __init__(self, width: int, num_classes: int, options: dict | None = None) -> None:
        super().__init__(width, num_classes)
        self.out_channels = num_classes
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def class_scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs


LINEAR = ClassifierSpec(name="linear", title="linear (the paper's): K logits per token", factory=LinearClassifier)


def list_classifiers() -> list[str]:
    """Names of all installed classifiers, sorted."""
    return sorted(discover(CLASSIFIER_GROUP, "classifier"))


def get_classifier(name: str | ClassifierSpec) -> ClassifierSpec:
    """Look up an installed classifier by name (a spec passes through unchanged)."""
    if isinstance(name, ClassifierSpec):
        return name
    return load_plugin(CLASSIFIER_GROUP, "classifier", name, ClassifierSpec, "none (reinstall regproxy)")


def label_levels(model: nn.Module) -> dict[str, tuple[list[str], torch.Tensor]]:
    """The coarser label levels a model's classifier defines (HSSN: ``category``), as name -> (level class names,
    class index -> level index); empty for a flat classifier or a model without one (an ONNX export)."""
    levels = getattr(model.token_classifier, "levels", None)  # optional in the classifier plugin's contract
    return levels() if callable(levels) else {}
