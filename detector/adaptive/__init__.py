"""Adaptive white-box attacks on the whole pipeline (classifier + path detector), their sanity checks, and
hardening against them."""

from .base import AdaptiveAttack, AdaptiveResult
from .detector_pgd import DetectorPGD
from .gradients import build_surrogate
from .mimicry import PathMimicry
from .pipeline import Pipeline
from .relaxation import SoftPValues, SoftTrees, relax
from .sanity import sanity_checks
from .selective import SelectivePGD
from .surrogate import DetectorSurrogate, IterateSurrogate, LinearSurrogate

__all__ = [
    "AdaptiveAttack",
    "AdaptiveResult",
    "DetectorPGD",
    "DetectorSurrogate",
    "IterateSurrogate",
    "LinearSurrogate",
    "PathMimicry",
    "Pipeline",
    "SelectivePGD",
    "SoftPValues",
    "SoftTrees",
    "build_surrogate",
    "relax",
    "sanity_checks",
]
