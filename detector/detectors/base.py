"""The estimator every detector is: scikit-learn's contract over a feature matrix.

``fit(X, y)`` learns to tell adversarial (y = 1) from clean (y = 0) rows, then calibrates a threshold
on clean rows at ``target_fpr``. ``decision_function`` is the one scoring function (an adversarial
score in [0, 1]); ``predict`` (score > threshold) and ``predict_proba`` derive from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, check_X_y
from threadpoolctl import threadpool_limits

from .scorers import IdentityScorer, LinearScorer, TreeScorer, export_scorer, scorer_from_state

Scorer = LinearScorer | TreeScorer | IdentityScorer

CLASSIFIERS = ("logreg", "rf", "gb", "identity")
# Gradient boosting on fewer rows than this is fitted on one OpenMP thread. Its parallel regions are one tree
# node each (microseconds at these sizes), so extra threads mostly wait at barriers: scikit-learn issue #30662
# reports up to 15x slowdowns on small data, and on a 2-core machine whose cores are busy, one fit of ~4,800
# rows x 487 columns took 35-53 s on two threads against 7-11 s on one. The trees are the same either way
# (each histogram is summed by one thread whatever the count).
SINGLE_THREAD_GB_ROWS = 50_000


def threshold_at_fpr(clean_scores: np.ndarray, target_fpr: float) -> float:
    """Smallest threshold t such that at most ``target_fpr`` of ``clean_scores`` are > t."""
    s = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("calibration needs at least one clean score")
    allowed = int(np.floor(target_fpr * len(s)))
    return float(s[len(s) - allowed - 1]) if allowed < len(s) else float(s[0] - 1e-12)


class FeatureDetector(ClassifierMixin, BaseEstimator):
    """Adversarial detector over a feature matrix with a pluggable classifier.

    Parameters
    ----------
    classifier : {"logreg", "rf", "gb", "identity"}
        Logistic regression on standardised features, random forest, histogram gradient boosting,
        or "identity": the one feature is the score (a fixed statistic such as feature squeezing's).
    target_fpr : float in (0, 1)
        False-positive rate on clean calibration rows that the threshold is set to.
    C : float > 0, inverse regularisation strength of the logistic regression.
    n_estimators : int >= 1, trees of the random forest / iterations of gradient boosting.
    max_depth : int or None, tree depth limit.
    random_state : int, seed of the tree ensembles.
    """

    def __init__(
        self,
        classifier: str = "logreg",
        target_fpr: float = 0.05,
        C: float = 1.0,
        n_estimators: int = 200,
        max_depth: int | None = None,
        random_state: int = 0,
    ) -> None:
        self.classifier = classifier
        self.target_fpr = target_fpr
        self.C = C
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.random_state = random_state

    # -- validation -----------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier={self.classifier!r} must be one of {CLASSIFIERS}")
        if not 0 < self.target_fpr < 1:
            raise ValueError(f"target_fpr={self.target_fpr} must be in (0, 1)")
        if self.C <= 0:
            raise ValueError(f"C={self.C} must be > 0")
        if self.n_estimators < 1:
            raise ValueError(f"n_estimators={self.n_estimators} must be >= 1")
        if self.max_depth is not None and self.max_depth < 1:
            raise ValueError(f"max_depth={self.max_depth} must be >= 1 or None")

    def _columns(self, n_features: int, groups: Sequence[str] | None) -> np.ndarray:
        """Which columns of X the classifier reads (all of them, unless a subclass selects)."""
        return np.arange(n_features)

    def _make_classifier(self):
        if self.classifier == "logreg":
            return make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=5000))
        if self.classifier == "rf":
            return RandomForestClassifier(
                n_estimators=self.n_estimators,
                max_depth=self.max_depth,
                min_samples_leaf=2,
                n_jobs=1,
                random_state=self.random_state,
            )
        return HistGradientBoostingClassifier(
            max_iter=self.n_estimators,
            max_depth=self.max_depth,
            learning_rate=0.1,
            early_stopping=False,
            random_state=self.random_state,
        )

    # -- estimator contract ---------------------------------------------------------------------
    def fit(self, X, y, *, groups: Sequence[str] | None = None, X_calibration=None) -> FeatureDetector:
        """Fit on features X (n_samples, n_features) with labels y (1 = adversarial, 0 = clean).

        groups : optional name of each column's feature group (see :class:`PathDetector`).
        X_calibration : clean rows to set the threshold on; by default the clean rows of X
            (optimistic: the same rows were used to fit).
        """
        self._check_params()
        X, y = check_X_y(X, y, dtype=np.float64)
        labels = np.unique(y)
        if not np.array_equal(labels, [0, 1]):
            raise ValueError(f"y must hold both labels 0 (clean) and 1 (adversarial), got {labels.tolist()}")
        if groups is not None and len(groups) != X.shape[1]:
            raise ValueError(f"groups has {len(groups)} names for {X.shape[1]} columns")
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.array([0, 1])
        self.columns_ = self._columns(X.shape[1], groups)
        if self.classifier == "identity":
            if len(self.columns_) != 1:
                raise ValueError(f"classifier='identity' needs exactly one feature, got {len(self.columns_)}")
            self.scorer_: Scorer = IdentityScorer()
        else:
            threads = 1 if self.classifier == "gb" and len(X) < SINGLE_THREAD_GB_ROWS else None
            with threadpool_limits(limits=threads, user_api="openmp"):
                self.scorer_ = export_scorer(self._make_classifier().fit(X[:, self.columns_], y))
        self.calibrate(X[y == 0] if X_calibration is None else X_calibration)
        return self

    def calibrate(self, X_clean) -> FeatureDetector:
        """Set ``threshold_`` so that at most ``target_fpr`` of the clean rows are flagged."""
        self.threshold_ = threshold_at_fpr(self.decision_function(X_clean), self.target_fpr)
        return self

    def decision_function(self, X) -> np.ndarray:
        """Adversarial score in [0, 1] for each row of X (n_samples, n_features_in_)."""
        check_is_fitted(self, "scorer_")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but this detector was fitted on {self.n_features_in_}")
        X = X[:, self.columns_]
        if not np.isfinite(X).all():  # only the columns read must be finite (NaN marks a column not computed)
            raise ValueError("X contains NaN or infinity in the columns this detector reads")
        return self.scorer_(X)

    def predict(self, X) -> np.ndarray:
        """1 where the score exceeds the calibrated threshold, else 0."""
        check_is_fitted(self, "threshold_")
        return (self.decision_function(X) > self.threshold_).astype(np.int64)

    def predict_proba(self, X) -> np.ndarray:
        s = self.decision_function(X)
        return np.column_stack([1.0 - s, s])

    # -- persistence (no pickle) ----------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors for safetensors and a JSON-able dict that :meth:`from_state` rebuilds from."""
        check_is_fitted(self, ["scorer_", "threshold_"])
        tensors, scorer_info = self.scorer_.to_state()
        tensors = {f"scorer.{k}": v for k, v in tensors.items()}
        tensors["columns"] = torch.from_numpy(self.columns_.astype(np.int64))
        info = {
            "estimator": type(self).__name__,
            "params": self.get_params(),
            "scorer": scorer_info,
            "threshold": self.threshold_,
            "n_features_in": int(self.n_features_in_),
        }
        return tensors, info

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict) -> FeatureDetector:
        if info.get("estimator") != cls.__name__:
            raise ValueError(f"state is of a {info.get('estimator')!r}, not a {cls.__name__}")
        det = cls(**info["params"])
        det._check_params()
        det.scorer_ = scorer_from_state(
            {k[7:]: v for k, v in tensors.items() if k.startswith("scorer.")}, info["scorer"]
        )
        det.columns_ = tensors["columns"].numpy()
        det.n_features_in_ = int(info["n_features_in"])
        det.threshold_ = float(info["threshold"])
        det.classes_ = np.array([0, 1])
        return det
