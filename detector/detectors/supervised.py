"""A supervised path score as one p-value among the ensemble's clean-only ones.

:class:`SupervisedComponent` fits a :class:`~detector.detectors.path.PathDetector` (gradient boosting by
default) on clean and noisy-clean validation rows against adversarial ones, and turns its log-odds into a
p-value under *other* clean rows (the calibration rows, :class:`~detector.detectors.clean.NullDistribution`),
so that :class:`~detector.detectors.ensemble.PathEnsembleDetector` can combine it with the clean-only scores
by the same non-negative min-p rule. The component can still be fooled by an attack it never saw; what the
combination guarantees is that it cannot make any *other* component's departure from clean paths count
against detection.

The hard path is left out by default: it is the soft path thresholded at 0.5, a split every tree can make on
the soft column itself, so it doubles the fitting cost and adds nothing a tree cannot already read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from .clean import NullDistribution
from .path import PathDetector

SUPERVISED_GROUPS = ("soft", "density", "proto", "confidence")


def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


class SupervisedComponent(BaseEstimator):
    """Supervised path classifier whose score is a p-value under clean calibration rows.

    Parameters
    ----------
    classifier : a :class:`PathDetector` classifier ("gb" by default, "logreg", "rf").
    feature_groups : path-feature groups the classifier reads.
    n_estimators : boosting iterations / trees (100, scikit-learn's default for gradient boosting: the evaluation's
        held-out tables refit this component some 40 times).
    target_fpr, random_state : see :class:`~detector.detectors.base.FeatureDetector`.
    """

    clean_only = False

    def __init__(
        self,
        classifier: str = "gb",
        feature_groups: Sequence[str] = SUPERVISED_GROUPS,
        n_estimators: int = 100,
        target_fpr: float = 0.05,
        random_state: int = 0,
    ) -> None:
        self.classifier = classifier
        self.feature_groups = feature_groups
        self.n_estimators = n_estimators
        self.target_fpr = target_fpr
        self.random_state = random_state

    def _detector(self) -> PathDetector:
        return PathDetector(
            feature_groups=list(self.feature_groups),
            classifier=self.classifier,
            n_estimators=self.n_estimators,
            target_fpr=self.target_fpr,
            random_state=self.random_state,
        )

    def fit(self, X, y, *, groups: Sequence[str], X_calibration) -> SupervisedComponent:
        """Fit on rows X with labels y (1 = adversarial; clean and noisy clean rows 0); the null of the
        log-odds on the clean rows ``X_calibration`` (none of them in X)."""
        if X_calibration is None or len(X_calibration) < 10:
            raise ValueError("a supervised component needs >= 10 clean calibration rows outside its fitting rows")
        self.detector_ = self._detector().fit(X, y, groups=groups, X_calibration=X_calibration)
        self.columns_ = self.detector_.columns_
        self.logit_columns_ = np.zeros(0, dtype=np.int64)
        self.n_features_in_ = self.detector_.n_features_in_
        self.null_ = NullDistribution(self.raw_score(X_calibration))
        return self

    def raw_score(self, X) -> np.ndarray:
        """The classifier's log-odds of each row being adversarial."""
        check_is_fitted(self, "detector_")
        return _log_odds(self.detector_.decision_function(np.asarray(X, dtype=np.float64)))

    def neg_log_p(self, X) -> np.ndarray:
        check_is_fitted(self, "null_")
        return self.null_.neg_log_p(self.raw_score(X))

    def get_params(self, deep: bool = True) -> dict:
        params = super().get_params(deep)
        params["feature_groups"] = list(params["feature_groups"])
        return params

    # -- persistence ------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        check_is_fitted(self, ["detector_", "null_"])
        tensors, info = self.detector_.to_state()
        tensors = {f"detector.{k}": v for k, v in tensors.items()}
        tensors["null"] = self.null_.to_tensor()
        return tensors, {"estimator": type(self).__name__, "params": self.get_params(), "detector": info}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict) -> SupervisedComponent:
        if info.get("estimator") != cls.__name__:
            raise ValueError(f"state is of a {info.get('estimator')!r}, not a {cls.__name__}")
        if "null" not in tensors:
            raise ValueError(f"{cls.__name__} state lacks its null distribution")
        comp = cls(**info["params"])
        comp.detector_ = PathDetector.from_state(
            {k[len("detector.") :]: v for k, v in tensors.items() if k.startswith("detector.")}, info["detector"]
        )
        comp.columns_ = comp.detector_.columns_
        comp.logit_columns_ = np.zeros(0, dtype=np.int64)
        comp.n_features_in_ = comp.detector_.n_features_in_
        comp.null_ = NullDistribution(tensors["null"].numpy())
        return comp
