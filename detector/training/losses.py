"""The loss terms of METHOD.md section 2, each a plain function of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-6


def binary_entropy(p: Tensor) -> Tensor:
    """Elementwise entropy (nats) of Bernoulli(p)."""
    p = p.clamp(_EPS, 1 - _EPS)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def infomax_loss(p: Tensor) -> Tensor:
    """``-(H(mean_x p) - mean_x H(p))`` averaged over gates, for p of shape (N, C).

    The bracket is the mutual information between a gate and the input over the batch: high
    when each input decides firmly (low conditional entropy) and inputs decide differently
    (high marginal entropy). The loss is its negative: in [-log 2, 0].
    """
    marginal = binary_entropy(p.mean(dim=0))
    conditional = binary_entropy(p).mean(dim=0)
    return -(marginal - conditional).mean()


def sparsity_loss(soft_path: Tensor) -> Tensor:
    """Mean soft gate over all gates and inputs: an L1 penalty on the architecture encoding."""
    return soft_path.mean()


def align_loss(encoding: Tensor, p: Tensor, distance: str = "mse") -> Tensor:
    """Distance between a layer's own normalised response e and its gate p (both (N, C) in [0, 1]).

    Pulls switched-off filters towards being silent on their own, and the gate towards the filters
    that do respond, so the path explains the computation instead of masking it.
    """
    if distance == "mse":
        return F.mse_loss(p, encoding)
    if distance == "bce":
        return F.binary_cross_entropy(p.clamp(_EPS, 1 - _EPS), encoding.clamp(0, 1))
    raise ValueError(f"distance={distance!r} must be 'mse' or 'bce'")


def mi_variational_loss(path_logits: Tensor, labels: Tensor) -> Tensor:
    """CE of the auxiliary head q(y | path): a lower bound on I(path; y) up to H(y)."""
    return F.cross_entropy(path_logits, labels)


def mean_over_layers(values: list[Tensor]) -> Tensor:
    return torch.stack(values).mean()
