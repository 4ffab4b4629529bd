"""Adaptive attack 2: path mimicry — make the input take the calculation path of the class it is pushed to."""

from __future__ import annotations

import torch
from torch import Tensor

from ..models import PathOutput
from .base import AdaptiveAttack


class PathMimicry(AdaptiveAttack):
    """Targeted Linf PGD that pulls the soft path towards the target class's prototype path (a feature-matching
    attack in the sense of Tramer et al. 2020, section 5; Sabour et al. 2016's "adversarial manipulation of
    deep representations", on the calculation path instead of the activations).

    Minimises, per image, ``classifier term towards t + lam * mean_l mean_c (p_lc(x) - m_tc)^2``: the squared
    distance between the soft gates of every gated layer and the class-t mean soft path ``m_t`` of the
    prototypes, each layer weighted equally. The target t is the clean image's runner-up class
    (``target="runner-up"``) or a fixed class index (images of that class take their runner-up instead).
    The gradients do not use the detector; which iterate is returned does (see :class:`AdaptiveAttack`).
    Budget: Linf ``eps`` in [0, 1] pixel space; images stay in [0, 1].
    """

    name = "mimicry"

    def __init__(self, pipeline, *, target: str | int = "runner-up", **kwargs) -> None:
        super().__init__(pipeline, **kwargs)
        k = pipeline.model.num_classes
        if target != "runner-up" and not (isinstance(target, int) and 0 <= target < k):
            raise ValueError(f"target={target!r} must be 'runner-up' or a class index in [0, {k})")
        self.target = target
        protos = pipeline.prototypes
        self._slices = protos.layer_slices()
        self._soft_mean = protos.soft_mean.to(pipeline.device)

    def targets(self, logits: Tensor, labels: Tensor) -> Tensor:
        masked = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
        runner = masked.argmax(1)
        if self.target == "runner-up":
            return runner
        fixed = torch.full_like(labels, int(self.target))
        return torch.where(labels == fixed, runner, fixed)

    def terms(self, out: PathOutput, X: Tensor, labels: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        proto = self._soft_mean[targets]
        per_layer = [
            ((layer.soft - proto[:, sl]) ** 2).mean(1) for layer, sl in zip(out.layers, self._slices, strict=True)
        ]
        dist = torch.stack(per_layer, dim=1).mean(1)
        return self.classifier_term(out.logits, labels, targets), dist

    def describe(self) -> dict:
        return {**super().describe(), "target": self.target}
