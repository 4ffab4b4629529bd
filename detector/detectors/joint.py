"""A clean-only kNN score on the path and the output together.

The soft path alone (``clean-knn``) separates gradient-sign and query attacks from clean images but barely
sees minimal-perturbation attacks (CW, DeepFool), which stop just past the decision boundary with a path
that still looks like a clean image's; the softmax margin alone sees those but not over-confident PGD
outputs. A p-value combination of the two (``clean-ensemble``) pays for each with the other's clean false
positives. This detector instead measures one distance in the joint space of the soft path, the logits and
the log softmax margin, so that a low margin counts as unusual only where the path and logits are unlike
those of the clean low-margin images of the predicted class. Nothing is learnt from adversarial examples:
the blocks' weights are fixed parameters, and the defaults were chosen on validation images only
(``python -m bench.clean_validation``; the figures are in its report).
"""

from __future__ import annotations

import numpy as np

from ..features import CONFIDENCE
from .clean import CleanDetector, _half, knn_distance, per_class_subset, reference_radius

MARGIN_FLOOR = 1e-6  # log(margin) is clipped here: a margin of exactly 0 stays finite


def log_margin(margin: np.ndarray) -> np.ndarray:
    """The joint score's margin column: log of the softmax margin, clipped at :data:`MARGIN_FLOOR`."""
    return np.log(np.maximum(margin, MARGIN_FLOOR))


def block_column_weights(widths: list[int], weights: list[float]) -> np.ndarray:
    """One weight per column: each block's ``weight / sqrt(its width)``, so that a block's squared distance counts
    as ``weight ** 2`` per standardised column on average and a thin block is not drowned by a wide one."""
    return np.concatenate([np.full(n, wt / np.sqrt(n)) for n, wt in zip(widths, weights)])


def standardiser(Z: np.ndarray, column_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(center, spread) that standardise every column of the clean rows ``Z`` and then apply its weight:
    ``(Z - center) / spread``. A constant column keeps spread 1 (times its weight)."""
    sd = Z.std(0)
    return Z.mean(0), np.where(sd > 1e-6, sd, 1.0) / column_weights.clip(1e-12)


def knn_reference(
    Z: np.ndarray, pred: np.ndarray, per_class: int, n_classes: int, k: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference rows at bundle precision, their predicted classes, their radii): at most ``per_class`` seeded
    rows of each predicted class of the standardised clean rows ``Z``."""
    keep = per_class_subset(pred, per_class, n_classes, seed)
    reference, reference_class = _half(Z[keep]), pred[keep].astype(np.int64)
    return reference, reference_class, reference_radius(reference, reference_class, k)


class PathOutputKNNDetector(CleanDetector):
    """Distance to the ``k`` nearest clean rows of the predicted class in (soft path, logits, log margin),
    relative to how sparse the clean rows are there.

    Every column is standardised over the clean fitting rows; then each block is scaled so that its squared
    distance counts as ``weight ** 2`` per standardised column on average: the soft path by
    ``1 / sqrt(n_filters)``, the logits by ``logit_weight / sqrt(n_classes)``, the log margin by
    ``margin_weight``. A thin block therefore is not drowned by the path's many filters. The raw score is the
    mean distance to the ``k`` nearest reference rows of the predicted class divided by ``r ** local``, where r
    is those neighbours' own mean distance to their ``k`` nearest reference rows: clean images of a class whose
    paths vary widely (a sparse region) are not flagged for being far from each other, while an attacked input
    far from a dense cluster is (``local=0``: plain kNN distance; 1: a local-outlier-factor ratio).

    Parameters
    ----------
    k : int >= 1, neighbours (for the distance and for the reference rows' radii).
    max_reference : int >= 1, most clean rows kept per predicted class (a random subset).
    logit_weight, margin_weight : float >= 0, the blocks' weights relative to the soft path's (1).
    local : float in [0, 1], the exponent of the neighbours' radius that divides the distance.
    target_fpr, random_state : see :class:`~detector.detectors.clean.CleanDetector`.
    """

    _STATE = ("reference", "reference_class", "radius", "center", "spread")

    def __init__(
        self,
        k: int = 20,
        max_reference: int = 2000,
        logit_weight: float = 1.0,
        margin_weight: float = 0.6,
        local: float = 0.5,
        target_fpr: float = 0.05,
        random_state: int = 0,
    ) -> None:
        super().__init__(target_fpr=target_fpr, random_state=random_state)
        self.k = k
        self.max_reference = max_reference
        self.logit_weight = logit_weight
        self.margin_weight = margin_weight
        self.local = local

    def _check_params(self) -> None:
        super()._check_params()
        if self.k < 1 or self.max_reference < 1:
            raise ValueError(f"k={self.k} and max_reference={self.max_reference} must be >= 1")
        if self.logit_weight < 0 or self.margin_weight < 0:
            raise ValueError(f"logit_weight={self.logit_weight} and margin_weight={self.margin_weight} must be >= 0")
        if not 0 <= self.local <= 1:
            raise ValueError(f"local={self.local} must be in [0, 1]")

    def _groups(self) -> tuple[str, ...]:
        return ("soft", "confidence", "logits")

    def _joint(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, column weights): soft path, logits and log margin of the selected columns X (in feature-layout
        order: soft path, confidence, logits)."""
        G, K = int(self.layer_sizes_.sum()), len(self.logit_columns_)
        if X.shape[1] != G + len(CONFIDENCE) + K:
            raise ValueError(f"expected {G} soft-path, {len(CONFIDENCE)} confidence and {K} logit columns")
        margin = X[:, G + CONFIDENCE.index("margin")]
        rows = np.hstack([X[:, :G], X[:, G + len(CONFIDENCE) :], log_margin(margin)[:, None]])
        return rows, block_column_weights([G, K, 1], [1.0, self.logit_weight, self.margin_weight])

    def _transform(self, X: np.ndarray, fit: bool = False) -> np.ndarray:
        Z, w = self._joint(X)
        if fit:
            self.center_, self.spread_ = standardiser(Z, w)
        return (Z - self.center_) / self.spread_

    def _fit_model(self, X: np.ndarray, pred: np.ndarray) -> None:
        Z = self._transform(X, fit=True)
        self.reference_, self.reference_class_, self.radius_ = knn_reference(
            Z, pred, self.max_reference, len(self.logit_columns_), self.k, self.random_state
        )

    def _raw(self, X: np.ndarray, pred: np.ndarray) -> np.ndarray:
        Z = self._transform(X)
        return knn_distance(Z, pred, self.reference_, self.reference_class_, self.k, self.radius_, self.local)
