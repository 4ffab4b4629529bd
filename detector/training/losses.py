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
    that do respond, so the path explains the computation instead of masking it. Symmetric: it also
    pulls the gate of a weakly responding filter down, so the layer's density drifts to the mean of e.
    """
    if distance == "mse":
        return F.mse_loss(p, encoding)
    if distance == "bce":
        return F.binary_cross_entropy(p.clamp(_EPS, 1 - _EPS), encoding.clamp(0, 1))
    raise ValueError(f"distance={distance!r} must be 'mse' or 'bce'")


def onesided_align_loss(encoding: Tensor, p: Tensor) -> Tensor:
    """``mean((1 - p) * e)``: the response that switched-off filters still carry (N, C in [0, 1]).

    Its gradient silences a filter in proportion to how firmly its gate is off, and pushes a gate up
    in proportion to how strongly its filter responds, but nothing asks a switched-on filter to reach
    the layer's maximum or a gate to sit at any particular density: the FLOPs target decides how many
    filters run, this term decides that the ones that do not run are the silent ones.
    """
    return ((1 - p) * encoding).mean()


def rescale_encoding(encoding: Tensor, density: float) -> Tensor:
    """e rescaled per input so that its mean over filters is ``density`` (values clipped to [0, 1])."""
    return (encoding * (density / encoding.mean(dim=1, keepdim=True).clamp_min(_EPS))).clamp(0, 1)


def flops_target_loss(flops_ratio: Tensor, target: float) -> Tensor:
    """``(mean_x flops(x) - target)^2`` on the batch's executed-FLOPs ratio (N,).

    The ratio counts hard gates and carries their straight-through gradient, so this pulls exactly the
    figure the bundle reports. Each layer's gates are pulled in proportion to the FLOPs they control,
    so a cheap first layer is not forced sparse. Only the batch mean is constrained: inputs may differ.
    """
    return (flops_ratio.mean() - target) ** 2


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's distillation term: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, batch mean."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def feature_hint_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean((s - t)^2) / mean(t^2)``: the student's penultimate features' distance from the teacher's.

    Relative to the teacher's own energy, so the weight means the same whatever the features' scale; 0 when
    the student computes what the teacher does (a decoupled model at its start, every gate on).
    """
    return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(_EPS)


def mi_variational_loss(path_logits: Tensor, labels: Tensor) -> Tensor:
    """CE of the auxiliary head q(y | path): a lower bound on I(path; y) up to H(y)."""
    return F.cross_entropy(path_logits, labels)


def mean_over_layers(values: list[Tensor]) -> Tensor:
    return torch.stack(values).mean()
