"""Path features plus the Mahalanobis baseline's features in one logistic regression ("path+mahalanobis").

Mahalanobis is the partner because it is the strongest of the baselines in Lee et al.'s comparison (it
beat LID and KD+BU there) and it reads the same pooled layer outputs the gates act on, so the combination
asks whether the path adds anything to a good feature-space density. :class:`ConcatFeaturizer` is
generic: any featurizers whose group names do not clash can be concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from ..features import GROUPS as PATH_GROUPS
from .featurizer import Featurizer, PathFeaturizer
from .mahalanobis import MahalanobisDetector, MahalanobisFeaturizer
from .registry import DetectorEntry, register_detector, register_featurizer


class ConcatFeaturizer:
    """Columns of several featurizers side by side.

    Parameters
    ----------
    parts : non-empty sequence of featurizers; their column groups must be disjoint.

    Attributes
    ----------
    groups : the parts' groups, concatenated (set by :meth:`transform`, as the parts set theirs).
    """

    def __init__(self, parts: Sequence[Featurizer]) -> None:
        if not parts:
            raise ValueError("parts=[] must hold at least one featurizer")
        self.parts = list(parts)
        self.groups: list[str] = []

    def fit(self, images: Tensor, labels: Tensor) -> ConcatFeaturizer:
        for part in self.parts:
            part.fit(images, labels)
        return self

    def transform(self, images: Tensor) -> np.ndarray:
        """(N, sum F_i) of ``images`` (N, C, H, W) in [0, 1]."""
        blocks = [part.transform(images) for part in self.parts]
        owners: dict[str, int] = {}
        for i, part in enumerate(self.parts):
            for g in dict.fromkeys(part.groups):
                if owners.setdefault(g, i) != i:
                    raise ValueError(f"feature group {g!r} is produced by parts {owners[g]} and {i}")
        self.groups = [g for part in self.parts for g in part.groups]
        return np.concatenate(blocks, axis=1)


class CombinedDetector(MahalanobisDetector):
    """Classifier on the path feature groups ``feature_groups`` plus one noise magnitude's Mahalanobis scores.

    Parameters
    ----------
    feature_groups : non-empty subset of the path groups ``("soft", "hard", "density", "proto", "confidence")``.
    noise, cv : see :class:`MahalanobisDetector`; the magnitude is chosen on the Mahalanobis columns alone.
    classifier, target_fpr, C, n_estimators, max_depth, random_state : see :class:`FeatureDetector`.
    ``fit`` must be given ``groups``, the group of each column of X.
    """

    def __init__(
        self,
        feature_groups: Sequence[str] = PATH_GROUPS,
        noise: float | None = None,
        cv: int = 5,
        classifier: str = "logreg",
        target_fpr: float = 0.05,
        C: float = 1.0,
        n_estimators: int = 200,
        max_depth: int | None = None,
        random_state: int = 0,
    ) -> None:
        super().__init__(
            noise=noise,
            cv=cv,
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
        unknown = set(self.feature_groups) - set(PATH_GROUPS)
        if unknown or not self.feature_groups:
            raise ValueError(f"feature_groups={list(self.feature_groups)} must be a non-empty subset of {PATH_GROUPS}")
        if self.classifier == "identity":
            raise ValueError("classifier='identity' cannot combine several features; use logreg, rf or gb")

    def _columns(self, n_features: int, groups: Sequence[str] | None) -> np.ndarray:
        path = np.flatnonzero(np.isin(np.asarray(groups), list(self.feature_groups)))
        if len(path) == 0:
            raise ValueError(f"no column of X belongs to feature_groups={list(self.feature_groups)}")
        return np.concatenate([path, super()._columns(n_features, groups)])

    def get_params(self, deep: bool = True) -> dict:
        params = super().get_params(deep)
        params["feature_groups"] = list(params["feature_groups"])
        return params


register_featurizer(
    "path+mahalanobis",
    lambda ctx: ConcatFeaturizer(
        [
            PathFeaturizer(ctx.model, ctx.prototypes, ctx.batch_size),
            MahalanobisFeaturizer(ctx.model, batch_size=ctx.batch_size),
        ]
    ),
)
register_detector(
    DetectorEntry(
        "path+mahalanobis",
        "path+mahalanobis",
        lambda fpr, seed: CombinedDetector(classifier="logreg", target_fpr=fpr, random_state=seed),
        "logistic regression on all path features plus the Mahalanobis baseline's per-stage scores",
    )
)
