"""Which differentiable stand-in an adaptive attack follows for a fitted detector: its exact gradient, a
smooth relaxation of it, or a network refitted on the attack's iterates."""

from __future__ import annotations

import numpy as np
import torch

from ..detectors import FeatureDetector
from ..detectors.scorers import IdentityScorer, LinearScorer
from .relaxation import relax
from .surrogate import DetectorSurrogate, IdentitySurrogate, IterateSurrogate, LinearSurrogate

SURROGATE_KINDS = ("auto", "iterates")  # a relaxation where one exists / always the iterate-fitted network


def build_surrogate(
    detector: FeatureDetector,
    X_clean: np.ndarray | None = None,
    *,
    kind: str = "auto",
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> DetectorSurrogate:
    """What the attack differentiates in place of ``detector``, on ``device`` (the attacked model's).

    A linear (or identity) detector is its own exact surrogate. Otherwise ``kind="auto"`` takes the
    detector's smooth relaxation (:func:`~detector.adaptive.relaxation.relax`) where one exists, and
    ``kind="iterates"`` (or a detector without a relaxation) an :class:`IterateSurrogate` started on the
    clean rows ``X_clean``.
    """
    if kind not in SURROGATE_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {SURROGATE_KINDS}")
    scorer = getattr(detector, "scorer_", None)
    if isinstance(scorer, LinearScorer):
        return LinearSurrogate(scorer, detector.columns_, float(detector.threshold_)).to(device)
    if isinstance(scorer, IdentityScorer):
        return IdentitySurrogate(detector.columns_, float(detector.threshold_)).to(device)
    if kind == "auto":
        relaxed = relax(detector, X_clean)
        if relaxed is not None:
            return relaxed.to(device)
    if X_clean is None:
        raise ValueError("a detector without an exact or relaxed gradient needs X_clean, clean rows to start from")
    return IterateSurrogate(detector, X_clean, seed=seed, device=device)
