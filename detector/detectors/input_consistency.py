"""Input consistency: does the image itself look like the class the network predicts?

A clean-only detector (fitted on clean images alone, :mod:`detector.detectors.clean`) that reads the ``input``
group of the path features, the image's own pixels. A small perturbation can move the network's answer (and,
through a hard gate's jump, its whole path and output far from the decision boundary) but barely moves the image:
an attacked shirt still lies among the clean shirts in pixel space while the network says "bag". This is the
method's "early shirt, late bag" signature (METHOD.md 3.3) taken to the earliest layer there is, the input.

The raw score of an image predicted as class c is the mean distance to its ``k`` nearest clean reference images
of class c minus the smallest such distance to any other class, in the space of the clean images' first
``n_components`` principal components: positive when another class's clean images are nearer than the
predicted class's. Measured on the evaluation's validation rows (stop 35; ``input_consistency`` in
``reports/evaluation/cw_misses.json``): it catches 60% (34 of 57) of the CW examples that end far from the decision
boundary and that the softmax margin therefore misses; beside the shipped scores it raises every held-out attack's
AUROC (``reports/evaluation/selection_lofo.json``).
"""

from __future__ import annotations

import numpy as np

from ..features import INPUT
from .clean import CleanDetector, _half, per_class_subset, squared_distances


class InputConsistencyDetector(CleanDetector):
    """How much nearer the image is to clean images of another class than to those of its predicted class.

    Parameters
    ----------
    n_components : int >= 1, principal components of the clean reference images the distances use (fewer than
        the pixels: a smaller reference to store and to search, and pixel noise left out).
    k : int >= 1, nearest clean images per class whose mean distance is taken.
    max_reference : int >= 1, most clean reference images kept per predicted class (a seeded random subset).
    target_fpr, random_state : see :class:`~detector.detectors.clean.CleanDetector`.
    """

    _STATE = ("mean", "basis", "reference", "reference_class")

    def __init__(
        self,
        n_components: int = 50,
        k: int = 10,
        max_reference: int = 2000,
        target_fpr: float = 0.05,
        random_state: int = 0,
    ) -> None:
        super().__init__(target_fpr=target_fpr, random_state=random_state)
        self.n_components = n_components
        self.k = k
        self.max_reference = max_reference

    def _check_params(self) -> None:
        super()._check_params()
        if self.n_components < 1 or self.k < 1 or self.max_reference < 1:
            raise ValueError(
                f"n_components={self.n_components}, k={self.k} and max_reference={self.max_reference} must be >= 1"
            )

    def _groups(self) -> tuple[str, ...]:
        return (INPUT,)

    def _project(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean_) @ self.basis_.T).astype(np.float32)

    def _fit_model(self, X: np.ndarray, pred: np.ndarray) -> None:
        from sklearn.decomposition import PCA

        n = min(self.n_components, X.shape[1], len(X))
        pca = PCA(n, random_state=self.random_state).fit(X)
        self.mean_, self.basis_ = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
        keep = per_class_subset(pred, self.max_reference, len(self.logit_columns_), self.random_state)
        order = keep[np.argsort(pred[keep], kind="stable")]
        self.reference_, self.reference_class_ = _half(self._project(X[order])), pred[order].astype(np.int64)

    def class_distances(self, X: np.ndarray) -> np.ndarray:
        """(n, K) mean distance of each input-group row to its ``k`` nearest clean reference images of each class
        (inf for a class without reference images)."""
        K = len(self.logit_columns_)
        Z = self._project(X)
        out = np.full((len(X), K), np.inf)
        for s in range(0, len(Z), 1024):
            d2 = squared_distances(Z[s : s + 1024], self.reference_)
            for c in range(K):
                cols = self.reference_class_ == c
                if not cols.any():
                    continue
                kk = min(self.k, int(cols.sum()))
                near = np.partition(d2[:, cols], kk - 1, axis=1)[:, :kk]
                out[s : s + 1024, c] = np.sqrt(np.clip(near, 0, None)).mean(1)
        return out

    def _raw(self, X: np.ndarray, pred: np.ndarray) -> np.ndarray:
        dist = self.class_distances(X)
        own = dist[np.arange(len(X)), pred]
        dist[np.arange(len(X)), pred] = np.inf
        return own - dist.min(1)
