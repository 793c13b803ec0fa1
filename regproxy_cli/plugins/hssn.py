"""HSSN as a RegProxy classifier plugin: hierarchical scores per token, the tree-min loss, path inference.

"Deep Hierarchical Semantic Segmentation" (Li et al., CVPR 2022; authors' code ``0liliulei/HieraSeg``). A
two-level class tree (superclasses over the dataset's classes, ``hierarchy.yaml``: superclass -> classes) is
scored by one linear layer per token: K leaf channels then S superclass channels, painted onto pixels as they are.

Training (``loss.kind: hssn``), as the authors' Cityscapes loss:

* tree-min BCE on sigmoid scores (Eq. 4-5): a positive node scores the min over itself and its ancestors, a
  negative node the max over itself and its descendants; each level averaged over labelled pixels and its
  channels, the two summed and weighted 5 (``tree_min_weight``; the authors' constant); ``focal: true`` is Eq. 6
  with ``loss.focal_gamma``;
* cross-entropy at each level, on that level's channels only (weight 1 each), normalised as ``loss.mean_over``;
* optionally the tree-triplet term (``triplet_weight`` > 0; the authors use 0.5) on the L2-normalised final tokens:
  anchor a class's tokens, positive a sibling class's, negative another superclass's, margin 0.6, its weight
  rising along a half cosine over the run. Token labels are the arg-max of each token's region label histogram.

The authors' code lets void pixels become class 0 in its CE terms after the BCE (an in-place label edit); here
void is ignored by every term.

Inference (``classifier_options.inference``): ``path`` (default) scores each root-to-leaf path by the sum of its
nodes' sigmoid scores (the paper) and ``softmax-sum`` adds a softmax over all channels' parent probability to each
leaf's (the authors' released code); either way the label is a leaf and its category is the leaf's parent, so a
prediction never violates the tree.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from regproxy_cli.engine.finetune import class_key
from regproxy_cli.engine.losses import LossContext, LossSpec, segmentation_loss, token_labels
from regproxy_cli.errors import RegproxyError, listed
from regproxy_cli.model.classifiers import ClassifierSpec

INFERENCE = ("path", "softmax-sum")
EPS = 1e-8  # inside the logs, as the authors
TRIPLET_MARGIN = 0.6  # the authors' m = 0.1 + (4 - 2) / 4 for a two-level tree
TRIPLET_PER_CLASS = 200  # anchors (and positives, negatives) per class and batch, as the authors


def read_hierarchy(source: str | dict, classes: list[str]) -> dict[str, list[str]]:
    """Superclass -> its classes (spelled as the dataset spells them, in dataset order), from a file or mapping.

    Every class must sit under exactly one superclass; names match case- and separator-insensitively.
    """
    where = "the hierarchy"
    if isinstance(source, str):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise RegproxyError(f"hierarchy {source}: no such file")
        try:
            source = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            raise RegproxyError(f"{path}: not valid YAML") from None
    if not isinstance(source, dict) or not source or not all(
            isinstance(members, list) and members and all(isinstance(m, str) for m in members)
            for members in source.values()):
        raise RegproxyError(f"{where}: expected a mapping of superclass names to non-empty lists of class names")
    by_key = {class_key(name): name for name in classes}
    seen: dict[str, str] = {}
    unknown = []
    for superclass, members in source.items():
        for member in members:
            if class_key(member) not in by_key:
                unknown.append(member)
            elif class_key(member) in seen:
                raise RegproxyError(f"{where}: class {member!r} is under both {seen[class_key(member)]!r} and "
                                    f"{superclass!r}")
            else:
                seen[class_key(member)] = str(superclass)
    if unknown:
        raise RegproxyError(f"{where}: {listed(unknown)} not among the dataset's classes ({listed(classes, 8)})")
    missing = [name for name in classes if class_key(name) not in seen]
    if missing:
        raise RegproxyError(f"{where}: {listed(missing)} under no superclass")
    order = {name: i for i, name in enumerate(classes)}
    return {str(s): sorted((by_key[class_key(m)] for m in members), key=order.get) for s, members in source.items()}


class HierarchicalClassifier(nn.Linear):
    """One linear layer scoring K leaves then S superclasses per token; ``class_scores`` picks the best path."""

    def __init__(self, width: int, num_classes: int, options: dict) -> None:
        superclasses, parent = list(options["hierarchy"]), options["parent"]
        if len(parent) != num_classes:
            raise RegproxyError(f"the hierarchy places {len(parent)} classes, the model has {num_classes}")
        super().__init__(width, num_classes + len(superclasses))
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)
        self.num_classes, self.superclasses = num_classes, superclasses
        self.out_channels = num_classes + len(superclasses)
        self.inference = options.get("inference", "path")
        # leaf -> superclass; in the state dict too (models are built on the meta device, then loaded)
        self.register_buffer("parent", torch.tensor(parent, dtype=torch.long))

    def levels(self) -> dict[str, tuple[list[str], torch.Tensor]]:
        """The coarser label levels: name -> (their class names, leaf index -> level index)."""
        return {"category": (self.superclasses, self.parent)}

    def class_scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """(B, K + S, ...) outputs -> (B, K, ...) path scores: the arg-max leaf ends the best root-to-leaf path."""
        leaves, supers = outputs[:, : self.num_classes], outputs[:, self.num_classes:]
        if self.inference == "path":
            return torch.sigmoid(leaves) + torch.sigmoid(supers.index_select(1, self.parent))
        probabilities = outputs.softmax(1)
        return probabilities[:, : self.num_classes] + probabilities[:, self.num_classes:].index_select(1, self.parent)


def resolve_options(options: dict, classes: list[str]) -> dict:
    """``model.classifier_options`` -> what config.json records: the hierarchy read in, each class's superclass."""
    unknown = sorted(set(options) - {"hierarchy", "inference", "parent"})
    if unknown:
        raise RegproxyError(f"hssn takes hierarchy and inference, not {', '.join(unknown)}")
    if "hierarchy" not in options:
        raise RegproxyError("hssn needs a hierarchy: a hierarchy.yaml (superclass: [classes]) or that mapping")
    inference = options.get("inference", "path")
    if inference not in INFERENCE:
        raise RegproxyError(f"hssn inference {inference!r} is not one of {', '.join(INFERENCE)}")
    hierarchy = read_hierarchy(options["hierarchy"], classes)
    superclass_of = {name: s for s, group in enumerate(hierarchy.values()) for name in group}
    return {"hierarchy": hierarchy, "inference": inference, "parent": [superclass_of[name] for name in classes]}


HSSN = ClassifierSpec(name="hssn", title="HSSN: K leaf + S superclass scores, tree-min loss, best-path inference",
                      factory=HierarchicalClassifier, resolve_options=resolve_options)


# ----------------------------------------------------------------------------------------------------------- loss

def tree_min_scores(scores: torch.Tensor, parent: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) scores of Eq. 4 from (B, K + S, ...) sigmoid scores.

    Positive: a leaf's min over itself and its parent, a superclass's own score (the root has none).
    Negative: a leaf's own score (no descendants), a superclass's max over itself and its leaves.
    """
    leaves, supers = scores[:, :num_classes], scores[:, num_classes:]
    positive = torch.cat([torch.minimum(leaves, supers.index_select(1, parent)), supers], 1)
    shape = list(leaves.shape)
    shape[1] = supers.shape[1]
    index = parent.view(1, -1, *([1] * (leaves.dim() - 2))).expand_as(leaves)
    child_max = torch.full(shape, -1.0, dtype=scores.dtype, device=scores.device).scatter_reduce(
        1, index, leaves, reduce="amax", include_self=True)
    negative = torch.cat([leaves, torch.maximum(supers, child_max)], 1)
    return positive, negative


def tree_min_loss(logits: torch.Tensor, labels: torch.Tensor, parent: torch.Tensor, num_classes: int, *,
                  focal_gamma: float | None = None, ignore_index: int = 255) -> torch.Tensor:
    """The tree-min BCE (focal when ``focal_gamma`` is given) of (B, K + S, H, W) logits: each level's mean over
    labelled pixels and its channels, summed over the two levels (the authors' weight 5 is applied by the caller)."""
    scores = torch.sigmoid(logits.float())
    positive, negative = tree_min_scores(scores, parent, num_classes)
    labelled = labels != ignore_index
    safe = torch.where(labelled, labels, 0)
    target = torch.cat([F.one_hot(safe, num_classes), F.one_hot(parent[safe], len(positive[0]) - num_classes)],
                       -1).permute(0, 3, 1, 2).to(scores.dtype)
    pos_term = -torch.log(positive + EPS)
    neg_term = -torch.log(1 - negative + EPS)
    if focal_gamma is not None:
        pos_term = pos_term * (1 - positive) ** focal_gamma
        neg_term = neg_term * negative ** focal_gamma
    per_channel = (target * pos_term + (1 - target) * neg_term) * labelled[:, None]
    count = labelled.sum().clamp(min=1)
    leaf = per_channel[:, :num_classes].sum() / (count * num_classes)
    superclass = per_channel[:, num_classes:].sum() / (count * (per_channel.shape[1] - num_classes))
    return leaf + superclass


def tree_triplet_loss(tokens: torch.Tensor, token_classes: torch.Tensor, parent: torch.Tensor,
                      margin: float = TRIPLET_MARGIN, per_class: int = TRIPLET_PER_CLASS,
                      ignore_index: int = 255) -> torch.Tensor:
    """The tree-triplet loss (Eq. 7) on (B, D, H, W) tokens with (B, H, W) token labels, cosine distance.

    For each class present: anchors its tokens, positives tokens of a sibling class (same superclass), negatives
    tokens of another superclass; the first ``per_class`` of each in raster order, paired by position (the authors'
    sampling). Averaged over the classes that have all three; 0 when none has.
    """
    features = F.normalize(tokens.permute(0, 2, 3, 1).reshape(-1, tokens.shape[1]).float(), dim=1)
    flat = token_classes.reshape(-1)
    labelled = flat != ignore_index
    features, flat = features[labelled], flat[labelled]
    group = parent[flat]
    losses = []
    for c in flat.unique().tolist():
        anchor = features[flat == c]
        positive = features[(group == parent[c]) & (flat != c)]
        negative = features[group != parent[c]]
        n = min(len(anchor), len(positive), len(negative), per_class)
        if n == 0:
            continue
        a, p, q = anchor[:n], positive[:n], negative[:n]
        d_positive = 1 - (a * p).sum(1)
        d_negative = 1 - (a * q).sum(1)
        losses.append(F.relu(d_positive - d_negative + margin).mean())
    if not losses:
        return tokens.sum() * 0.0
    return torch.stack(losses).mean()


def triplet_ramp(iteration: int, iters: int, weight: float) -> float:
    """The triplet term's weight along the run: a half cosine from 0 to ``weight`` (the authors' schedule)."""
    return weight * 0.5 * (1 - math.cos(math.pi * min(iteration, iters) / max(iters, 1)))


LOSS_OPTIONS = {"tree_min_weight": 5.0, "focal": False, "triplet_weight": 0.0, "triplet_margin": TRIPLET_MARGIN}


def resolve_loss_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise RegproxyError(f"hssn takes {', '.join(LOSS_OPTIONS)}, not {', '.join(unknown)}")
    resolved = {**LOSS_OPTIONS, **options}
    for key in ("tree_min_weight", "triplet_weight", "triplet_margin"):
        if not isinstance(resolved[key], (int, float)) or isinstance(resolved[key], bool) or resolved[key] < 0:
            raise RegproxyError(f"hssn {key} must be a number >= 0, got {resolved[key]!r}")
    if not isinstance(resolved["focal"], bool):
        raise RegproxyError(f"hssn focal must be true or false, got {resolved['focal']!r}")
    return resolved


class HierarchyLoss:
    """``loss.kind: hssn``: tree-min BCE x 5 + CE at each level (+ the tree-triplet term when asked)."""

    def __init__(self, context: LossContext) -> None:
        self.context, self.options = context, context.options
        self.classifier = context.model.token_classifier

    def __call__(self, output, labels: torch.Tensor, iteration: int) -> torch.Tensor:
        c, o, classifier = self.context, self.options, self.classifier
        k, parent = classifier.num_classes, classifier.parent
        outputs = output.outputs.float()
        labelled = labels != c.ignore_index
        category = torch.where(labelled, parent[torch.where(labelled, labels, 0)], labels)
        loss = segmentation_loss(outputs[:, :k], labels, mean_over=c.mean_over, class_weight=c.class_weight,
                                      ignore_index=c.ignore_index)
        loss = loss + segmentation_loss(outputs[:, k:], category, mean_over=c.mean_over,
                                             ignore_index=c.ignore_index)
        if o["tree_min_weight"] > 0:
            loss = loss + o["tree_min_weight"] * tree_min_loss(
                outputs, labels, parent, k, focal_gamma=c.focal_gamma if o["focal"] else None,
                ignore_index=c.ignore_index)
        weight = triplet_ramp(iteration, c.iters, o["triplet_weight"])
        if weight > 0:
            tokens = token_labels(output, labels, k, c.ignore_index)
            loss = loss + weight * tree_triplet_loss(output.tokens, tokens, parent, o["triplet_margin"],
                                                     ignore_index=c.ignore_index)
        return loss


HSSN_LOSS = LossSpec(name="hssn", title="HSSN: tree-min BCE x 5 + CE per level (+ tree-triplet)", factory=HierarchyLoss,
                     resolve_options=resolve_loss_options, classifier="hssn")
