"""Adversarial-input detectors, each a scikit-learn estimator over a feature matrix."""

from . import combined, ensemble, kdbu, lid, mahalanobis, squeeze  # noqa: F401  (the baselines register themselves)
from .base import FeatureDetector, threshold_at_fpr
from .clean import CleanDetector, LayerConsistencyDetector, PathLikelihoodDetector
from .ensemble import PathEnsembleDetector, detector_from_state
from .featurizer import Featurizer, FeaturizerContext, PathFeaturizer
from .path import PathDetector
from .registry import DETECTORS, FEATURIZERS, DetectorEntry, get_detector, register_detector, register_featurizer

__all__ = [
    "DETECTORS",
    "FEATURIZERS",
    "CleanDetector",
    "DetectorEntry",
    "FeatureDetector",
    "Featurizer",
    "FeaturizerContext",
    "LayerConsistencyDetector",
    "PathDetector",
    "PathEnsembleDetector",
    "PathFeaturizer",
    "PathLikelihoodDetector",
    "detector_from_state",
    "get_detector",
    "register_detector",
    "register_featurizer",
    "threshold_at_fpr",
]
