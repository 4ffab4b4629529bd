"""The path detector: a binary classifier on calculation-path features (METHOD.md section 3.3)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..features import GROUPS
from .base import FeatureDetector


class PathDetector(FeatureDetector):
    """Adversarial detector on the path features of :mod:`detector.features`.

    Parameters
    ----------
    feature_groups : which groups of columns to use, any of ``("soft", "hard", "density", "proto",
        "confidence")``. ``fit`` must then be given ``groups``, the group of each column of X.
    classifier, target_fpr, C, n_estimators, max_depth, random_state : see :class:`FeatureDetector`.
    """

    def __init__(
        self,
        feature_groups: Sequence[str] = GROUPS,
        classifier: str = "logreg",
        target_fpr: float = 0.05,
        C: float = 1.0,
        n_estimators: int = 200,
        max_depth: int | None = None,
        random_state: int = 0,
    ) -> None:
        super().__init__(
            classifier=classifier,
            target_fpr=target_fpr,
            C=C,
            n_estimators=n_estimators,
            max_depth=max_depth,
            random_state=random_state,
        )
        self.feature_groups = feature_groups

    def _check_params(self) -> None:
        super()._check_params()
        unknown = set(self.feature_groups) - set(GROUPS)
        if unknown or not self.feature_groups:
            raise ValueError(f"feature_groups={list(self.feature_groups)} must be a non-empty subset of {GROUPS}")

    def _columns(self, n_features: int, groups: Sequence[str] | None) -> np.ndarray:
        if groups is None:
            raise ValueError("PathDetector.fit needs groups=, the feature group of each column")
        cols = np.flatnonzero(np.isin(np.asarray(groups), list(self.feature_groups)))
        if len(cols) == 0:
            raise ValueError(f"no column of X belongs to feature_groups={list(self.feature_groups)}")
        return cols

    def get_params(self, deep: bool = True) -> dict:
        params = super().get_params(deep)
        params["feature_groups"] = list(params["feature_groups"])
        return params
