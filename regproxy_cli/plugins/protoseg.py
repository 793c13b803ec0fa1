"""ProtoSeg as a RegProxy classifier plugin: each class is M prototypes, a token scores a class by its best one.

"Rethinking Semantic Segmentation: A Prototype View" (Zhou et al., CVPR 2022; authors' code ``tfzhou/ProtoSeg``).
Tokens are projected (1x1 - ReLU - 1x1, LayerNorm) and L2-normalised; a class's score is the largest cosine
between the token and the class's M unit prototypes, then a LayerNorm over the K scores (the authors' ``mask_norm``).
These K scores are what is painted. The prototypes are not trained by gradient: they live in a buffer (so in the
checkpoint) and move by momentum.

Training (``loss.kind: protoseg``), as the authors' code, with tokens in place of pixels:

* token labels: the majority class of each token's region (its affinity-weighted label histogram);
* each class's labelled tokens are assigned to its M prototypes by Sinkhorn-Knopp (epsilon 0.05, 3 iterations as
  the authors; ``sinkhorn_iterations`` for more: 3 leave the prototypes' shares up to 0.08 from 1/M on random
  unit vectors, 30 bring them within 1e-4), a balanced assignment, so no prototype is left unused;
* loss = CE on the painted pixel scores + 0.01 x PPC (cross-entropy of the token over all K x M prototypes, the
  target its assigned prototype) + 0.001 x PPD (``(1 - cos)^2`` to that prototype);
* after the loss, each prototype moves towards the normalised mean of the *correctly predicted* tokens assigned to
  it, ``p <- normalise(0.999 p + 0.001 mean)``; under DDP those sums and counts are all-reduced first, so every
  process applies the same update (the authors average the updated prototypes instead).

Left out: the authors' Gumbel-softmax sample of the assignment for the update (their targets use its arg-max; here
both do) and their L2 normalisation over the image width before the LayerNorm (an axis slip in their code).
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regproxy_cli.engine.distributed import all_reduce_sum
from regproxy_cli.engine.losses import LossContext, LossSpec, segmentation_loss, token_labels
from regproxy_cli.errors import RegproxyError
from regproxy_cli.model.classifiers import ClassifierSpec

SINKHORN_EPSILON = 0.05
SINKHORN_ITERATIONS = 3
MOMENTUM = 0.999


def sinkhorn(similarities: torch.Tensor, epsilon: float = SINKHORN_EPSILON,
             iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """(n, M) similarities of n tokens to M prototypes -> (n, M) transport plan: each row sums to 1 and each
    prototype column to about n / M (exactly, as iterations grow): Sinkhorn-Knopp on ``exp(similarity / epsilon)``."""
    n, m = similarities.shape
    plan = torch.exp((similarities.float() - similarities.max().float()) / epsilon).t()  # (M, n); max: no overflow
    plan = plan / plan.sum()
    for _ in range(iterations):
        plan = plan / plan.sum(1, keepdim=True) / m  # each prototype holds 1/M of the mass
        plan = plan / plan.sum(0, keepdim=True) / n  # each token gives 1/n
    return (plan * n).t()


class PrototypeClassifier(nn.Module):
    """Projection + L2 norm, M unit prototypes per class (a buffer), class score = max cosine, LayerNorm over K."""

    def __init__(self, width: int, num_classes: int, options: dict) -> None:
        super().__init__()
        self.num_classes, self.prototypes_per_class = num_classes, options["prototypes"]
        self.out_channels = num_classes
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, width))
        self.feature_norm = nn.LayerNorm(width)
        self.score_norm = nn.LayerNorm(num_classes)
        prototypes = torch.empty(num_classes, self.prototypes_per_class, width)
        nn.init.trunc_normal_(prototypes, std=0.02)
        self.register_buffer("prototypes", F.normalize(prototypes, dim=-1))  # (K, M, D); in the checkpoint

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., D) tokens -> (..., D) unit embeddings."""
        return F.normalize(self.feature_norm(self.projection(tokens)), dim=-1)

    def similarities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(..., D) unit embeddings -> (..., K, M) cosines to every prototype."""
        # a copy: the momentum step updates the buffer in place while autograd may still hold this one
        return torch.einsum("...d,kmd->...km", embeddings, self.prototypes.to(embeddings.dtype, copy=True))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.score_norm(self.similarities(self.embed(tokens)).amax(-1))

    def class_scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def nearest_prototype(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., D) tokens -> (...,) index k * M + m of the best prototype of the token's predicted class."""
        similarities = self.similarities(self.embed(tokens))
        predicted = self.score_norm(similarities.amax(-1)).argmax(-1)
        best = similarities.gather(-2, predicted[..., None, None].expand(*predicted.shape, 1,
                                                                          similarities.shape[-1])).squeeze(-2)
        return predicted * self.prototypes_per_class + best.argmax(-1)

    def prototype_palette(self, palette) -> np.ndarray:
        """(K * M, 3) colours: each class's colour in M shades (lighter to darker), for the prototype region map."""
        colours = []
        for rgb in np.asarray(palette, dtype=np.float64) / 255:
            hue, lightness, saturation = colorsys.rgb_to_hls(*rgb)
            for m in range(self.prototypes_per_class):
                shade = 0.25 + 0.5 * (m + 0.5) / self.prototypes_per_class
                colours.append(colorsys.hls_to_rgb(hue, 1 - shade if self.prototypes_per_class > 1 else lightness,
                                                   max(saturation, 0.35)))
        return np.round(np.array(colours) * 255).astype(np.uint8)

    @torch.no_grad()
    def assign(self, embeddings: torch.Tensor, classes: torch.Tensor,
               iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
        """(N, D) embeddings of labelled tokens and their (N,) classes -> (N,) prototype index within the class,
        by Sinkhorn-Knopp over each class's tokens."""
        assignment = torch.zeros_like(classes)
        similarities = self.similarities(embeddings.float())  # (N, K, M)
        for k in classes.unique().tolist():
            members = classes == k
            assignment[members] = sinkhorn(similarities[members, k], iterations=iterations).argmax(1)
        return assignment

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor, classes: torch.Tensor, assignment: torch.Tensor,
               correct: torch.Tensor, momentum: float = MOMENTUM) -> None:
        """Move each prototype towards the normalised mean of the correctly predicted tokens assigned to it."""
        k, m, d = self.prototypes.shape
        index = (classes * m + assignment)[correct]
        sums = torch.zeros(k * m, d, device=embeddings.device).index_add_(0, index, embeddings[correct].float())
        counts = torch.zeros(k * m, device=embeddings.device).index_add_(0, index, torch.ones_like(index,
                                                                                                dtype=torch.float))
        # every process applies the same update: the batch's sums over all processes
        sums, counts = all_reduce_sum(sums).to(sums.device), all_reduce_sum(counts).to(counts.device)
        moved = counts > 0
        flat = self.prototypes.view(k * m, d)
        # only the moved ones are renormalised: a prototype no correct token reached keeps its bits
        flat[moved] = F.normalize(momentum * flat[moved] + (1 - momentum) * F.normalize(sums[moved], dim=-1), dim=-1)


def resolve_options(options: dict, classes: list[str]) -> dict:
    unknown = sorted(set(options) - {"prototypes"})
    if unknown:
        raise RegproxyError(f"protoseg takes prototypes, not {', '.join(unknown)}")
    prototypes = options.get("prototypes", 10)
    if not isinstance(prototypes, int) or isinstance(prototypes, bool) or not 1 <= prototypes <= 64:
        raise RegproxyError(f"protoseg prototypes must be an integer 1..64, got {prototypes!r}")
    return {"prototypes": prototypes}


PROTOSEG = ClassifierSpec(name="protoseg", title="ProtoSeg: M momentum prototypes per class, score = max cosine",
                          factory=PrototypeClassifier, resolve_options=resolve_options)


LOSS_OPTIONS = {"ppc_weight": 0.01, "ppd_weight": 0.001, "momentum": MOMENTUM,
                "sinkhorn_iterations": SINKHORN_ITERATIONS}


def resolve_loss_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise RegproxyError(f"protoseg takes {', '.join(LOSS_OPTIONS)}, not {', '.join(unknown)}")
    resolved = {**LOSS_OPTIONS, **options}
    for key, value in resolved.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise RegproxyError(f"protoseg {key} must be a number >= 0, got {value!r}")
    if not isinstance(resolved["sinkhorn_iterations"], int) or resolved["sinkhorn_iterations"] < 1:
        raise RegproxyError(f"protoseg sinkhorn_iterations must be an integer >= 1, got "
                            f"{resolved['sinkhorn_iterations']!r}")
    if resolved["momentum"] > 1:
        raise RegproxyError(f"protoseg momentum must be in [0, 1], got {resolved['momentum']}")
    return resolved


class PrototypeLoss:
    """``loss.kind: protoseg``: CE on pixels + 0.01 PPC + 0.001 PPD on tokens, then the prototypes' momentum step."""

    def __init__(self, context: LossContext) -> None:
        self.context, self.options = context, context.options
        self.classifier = context.model.token_classifier

    def __call__(self, output, labels: torch.Tensor, iteration: int) -> torch.Tensor:
        c, o, classifier = self.context, self.options, self.classifier
        loss = segmentation_loss(output.logits, labels, mean_over=c.mean_over, class_weight=c.class_weight,
                                 ignore_index=c.ignore_index)
        classes = token_labels(output, labels, classifier.num_classes, c.ignore_index).reshape(-1)
        labelled = classes != c.ignore_index  # may be none: the update (a collective under DDP) still runs
        tokens = output.tokens.permute(0, 2, 3, 1).reshape(-1, output.tokens.shape[1])[labelled]
        embeddings = classifier.embed(tokens)
        classes = classes[labelled]
        assignment = classifier.assign(embeddings.detach(), classes, o["sinkhorn_iterations"])
        similarities = classifier.similarities(embeddings).flatten(1).float()  # (N, K * M), before this step's update
        target = classes * classifier.prototypes_per_class + assignment
        contrast = F.cross_entropy(similarities, target)
        distance = (1 - similarities.gather(1, target[:, None])).pow(2).mean()
        predicted = output.token_outputs.permute(0, 2, 3, 1).reshape(-1, classifier.num_classes)[labelled].argmax(1)
        classifier.update(embeddings.detach(), classes, assignment, predicted == classes, o["momentum"])
        if not labelled.any():
            return loss
        return loss + o["ppc_weight"] * contrast + o["ppd_weight"] * distance


PROTOSEG_LOSS = LossSpec(name="protoseg", title="ProtoSeg: CE + 0.01 PPC + 0.001 PPD, momentum prototypes",
                         factory=PrototypeLoss, resolve_options=resolve_loss_options, classifier="protoseg")
