"""Adversarial-input detectors, each a scikit-learn estimator over a feature matrix."""

from .base import FeatureDetector, threshold_at_fpr
from .path import PathDetector

__all__ = ["FeatureDetector", "PathDetector", "threshold_at_fpr"]
