"""Features of one input's calculation path, for the path detector (METHOD.md section 3.3).

Groups (each a block of columns; :data:`GROUPS` lists them):

``soft``        the soft path p, one column per filter (sum of filters over gated layers).
``hard``        the hard path g in {0, 1}, one column per filter.
``density``     fraction of active filters in each gated layer (L columns).
``proto``       per layer, how far the path departs from class prototypes (5 L columns):
                Hamming distance between g and the prototype path of the predicted class, and of the
                runner-up class; cosine distance between p and the class's mean soft path, for both;
                and the negative log-likelihood of g under the predicted class's filter frequencies.
                An adversarial input tends to follow its true class early and the target class late.
``confidence``  the classifier's max probability, margin between the top two, and entropy (3 columns).
``logits``      the classifier's logits (K columns). Not one of :data:`GROUPS` (the supervised detectors do
                not read them by default); the clean-only detectors take the predicted class from them.
``input``       the input image itself, flattened (C * H * W columns), only when the prototypes say so
                (``Prototypes.input_size``; bundles fitted before it lack the group). Not one of :data:`GROUPS`:
                only the input-consistency detector reads it (does the image look like the class predicted?).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .models import DecoupledNet, PathOutput
from .prototypes import Prototypes

GROUPS = ("soft", "hard", "density", "proto", "confidence")
CONFIDENCE = ("max_prob", "margin", "entropy")
LOGITS = "logits"
INPUT = "input"
PROTO = ("hamming_pred", "hamming_runner", "cosine_pred", "cosine_runner", "nll_pred")


def confidence_features(logits: Tensor) -> Tensor:
    """(N, 3): max probability, top-1 minus top-2 probability, entropy of the softmax."""
    prob = logits.softmax(1)
    top2 = prob.topk(2, dim=1).values
    entropy = -(prob * prob.clamp_min(1e-12).log()).sum(1)
    return torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1], entropy], dim=1)


def prototype_distances(out: PathOutput, protos: Prototypes) -> Tensor:
    """(N, L, 5): per layer, the :data:`PROTO` distances of each input's path.

    Computed for all layers at once: per-gate terms are summed per layer by a (G, L) membership matrix,
    which keeps the per-input cost a handful of tensor ops however many layers the model has.
    """
    top2 = out.logits.topk(2, dim=1).indices
    pred, runner = top2[:, 0], top2[:, 1]
    g, p = out.hard_path, out.soft_path
    t = protos.tensors(g.device)
    member, size = t["member"], t["size"]

    def per_layer_mean(x: Tensor) -> Tensor:
        return (x @ member) / size

    def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
        dot = (a * b) @ member
        norm = ((a * a) @ member).sqrt().clamp_min(1e-8) * ((b * b) @ member).sqrt().clamp_min(1e-8)
        return 1 - dot / norm

    nll = -per_layer_mean(g * t["log_freq"][pred] + (1 - g) * t["log_1m_freq"][pred])
    return torch.stack(
        [
            per_layer_mean((g - t["hard"][pred]).abs()),
            per_layer_mean((g - t["hard"][runner]).abs()),
            cosine_distance(p, t["soft_mean"][pred]),
            cosine_distance(p, t["soft_mean"][runner]),
            nll,
        ],
        dim=2,
    )


@dataclass
class PathFeatures:
    """Features of a batch and what produced them."""

    X: np.ndarray  # (N, F)
    groups: list[str]  # group of each column
    names: list[str]  # name of each column
    logits: Tensor  # (N, K)
    departure: Tensor  # (N, L): Hamming distance to the predicted class's prototype per layer
    out: PathOutput | None = None


def feature_layout(
    layer_names: list[str], layer_sizes: list[int], num_classes: int, input_size: int = 0
) -> tuple[list[str], list[str]]:
    """(groups, names) of the columns :func:`path_features` produces for a model (``input_size`` > 0: the input
    group last)."""
    groups, names = [], []
    for group in ("soft", "hard"):
        for layer, size in zip(layer_names, layer_sizes):
            names += [f"{group}.{layer}.{i}" for i in range(size)]
            groups += [group] * size
    names += [f"density.{layer}" for layer in layer_names]
    groups += ["density"] * len(layer_names)
    names += [f"{d}.{layer}" for layer in layer_names for d in PROTO]
    groups += ["proto"] * (len(PROTO) * len(layer_names))
    names += list(CONFIDENCE)
    groups += ["confidence"] * len(CONFIDENCE)
    names += [f"logit.{k}" for k in range(num_classes)]
    groups += [LOGITS] * num_classes
    names += [f"input.{i}" for i in range(input_size)]
    groups += [INPUT] * input_size
    return groups, names


def path_features(out: PathOutput, protos: Prototypes, images: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(N, F) feature matrix of one forward pass of ``images`` (needed when ``protos.input_size`` > 0), columns
    as :func:`feature_layout` names them, and the (N, L, 5) prototype distances it contains."""
    dist = prototype_distances(out, protos)
    parts = [out.soft_path, out.hard_path, out.density, dist.flatten(1), confidence_features(out.logits), out.logits]
    if protos.input_size:
        if images is None or images[0].numel() != protos.input_size:
            got = None if images is None else images[0].numel()
            raise ValueError(f"these prototypes need the input images ({protos.input_size} values each), got {got}")
        parts.append(images.flatten(1).to(out.logits.dtype))
    return torch.cat(parts, dim=1), dist


@torch.no_grad()
def extract_path_features(
    model: DecoupledNet, protos: Prototypes, images: Tensor, *, batch_size: int = 500, keep_output: bool = False
) -> PathFeatures:
    """Run ``images`` (N, C, H, W) in [0, 1] through ``model`` and return their path features."""
    model.eval()
    device = next(model.parameters()).device
    feats, logits, departure = [], [], []
    last = None
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        out = model.forward_path(x)
        X, dist = path_features(out, protos, x)
        feats.append(X.cpu())
        logits.append(out.logits.cpu())
        departure.append(dist[:, :, 0].cpu())
        last = out
    k = model.num_classes
    groups, names = feature_layout(protos.layer_names, protos.layer_sizes, k, protos.input_size)
    return PathFeatures(
        torch.cat(feats).numpy().astype(np.float64) if feats else np.zeros((0, len(names))),
        groups,
        names,
        torch.cat(logits) if logits else torch.zeros(0, k),
        torch.cat(departure) if departure else torch.zeros(0, len(protos.layer_sizes)),
        last if keep_output else None,
    )
