"""Adversarial-input detectors, each a scikit-learn estimator over a feature matrix."""

from . import combined, kdbu, lid, mahalanobis, squeeze  # noqa: F401  (the baselines register themselves)
from .base import FeatureDetector, threshold_at_fpr
from .featurizer import Featurizer, FeaturizerContext, PathFeaturizer
from .path import PathDetector
from .registry import DETECTORS, FEATURIZERS, DetectorEntry, get_detector, register_detector, register_featurizer

__all__ = ["DETECTORS", "FEATURIZERS", "DetectorEntry", "FeatureDetector", "Featurizer", "FeaturizerContext",
           "PathDetector", "PathFeaturizer", "get_detector", "register_detector", "register_featurizer",
           "threshold_at_fpr"]
