"""Adaptive white-box attacks on the whole pipeline (classifier + path detector), and hardening against them."""

from .base import AdaptiveAttack, AdaptiveResult
from .detector_pgd import DetectorPGD
from .mimicry import PathMimicry
from .pipeline import Pipeline
from .surrogate import DetectorSurrogate, FittedSurrogate, LinearSurrogate, build_surrogate, fit_surrogate

__all__ = [
    "AdaptiveAttack",
    "AdaptiveResult",
    "DetectorPGD",
    "DetectorSurrogate",
    "FittedSurrogate",
    "LinearSurrogate",
    "PathMimicry",
    "Pipeline",
    "build_surrogate",
    "fit_surrogate",
]
