"""Detectors by name, for ``pathguard evaluate --detectors``: each pairs a featurizer with an estimator.

Detectors that share a featurizer (all path-feature variants) share its features in one run. A featurizer
named ``"a+b"`` must be the concatenation of featurizers ``"a"`` and ``"b"`` (columns of ``a`` first): the
evaluation builds its features from theirs when it computes both anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .base import FeatureDetector
from .featurizer import Featurizer, FeaturizerContext, PathFeaturizer
from .path import PathDetector


@dataclass(frozen=True)
class DetectorEntry:
    name: str
    featurizer: str  # key into FEATURIZERS
    make: Callable[[float, int], FeatureDetector]  # (target_fpr, seed) -> unfitted estimator
    description: str
    # Fit with noisy clean images as extra negatives (Ma et al.'s LID recipe): Gaussian noise of the same
    # L2 norm as each fitting image's adversarial perturbation.
    noisy_negatives: bool = False


FEATURIZERS: dict[str, Callable[[FeaturizerContext], Featurizer]] = {}
DETECTORS: dict[str, DetectorEntry] = {}


def register_featurizer(name: str, factory: Callable[[FeaturizerContext], Featurizer]) -> None:
    if name in FEATURIZERS:
        raise ValueError(f"featurizer {name!r} is already registered")
    FEATURIZERS[name] = factory


def register_detector(entry: DetectorEntry) -> None:
    if entry.name in DETECTORS:
        raise ValueError(f"detector {entry.name!r} is already registered")
    DETECTORS[entry.name] = entry


def get_detector(name: str) -> DetectorEntry:
    if name not in DETECTORS:
        raise ValueError(f"detector={name!r} is not registered; choose from {sorted(DETECTORS)}")
    return DETECTORS[name]


register_featurizer("path", lambda ctx: PathFeaturizer(ctx.model, ctx.prototypes, ctx.batch_size))
register_detector(
    DetectorEntry(
        "path",
        "path",
        lambda fpr, seed: PathDetector(classifier="logreg", target_fpr=fpr, random_state=seed),
        "logistic regression on all path features (soft/hard path, densities, prototype distances, confidence)",
    )
)
register_detector(
    DetectorEntry(
        "path-rf",
        "path",
        lambda fpr, seed: PathDetector(classifier="rf", target_fpr=fpr, random_state=seed),
        "random forest on all path features",
    )
)
register_detector(
    DetectorEntry(
        "path-gb",
        "path",
        lambda fpr, seed: PathDetector(classifier="gb", target_fpr=fpr, random_state=seed),
        "gradient boosting on all path features",
    )
)
register_detector(
    DetectorEntry(
        "confidence",
        "path",
        lambda fpr, seed: PathDetector(
            feature_groups=["confidence"], classifier="logreg", target_fpr=fpr, random_state=seed
        ),
        "logistic regression on confidence alone (max probability, margin, entropy): the ablation baseline",
    )
)
