"""Local intrinsic dimensionality (LID) detector, after Ma et al., ICLR 2018.

The LID of a point is estimated by maximum likelihood (Levina & Bickel 2004; Amsaleg et al. 2015) from the
distances ``r_1 <= ... <= r_k`` to its k nearest neighbours::

    LID(x) = -( (1/k) * sum_i log(r_i / r_k) )^(-1)

As in the reference code (github.com/xingjunm/lid_adversarial_subspace_detection), the neighbours come from
a random minibatch of clean images (k = 20, minibatch 100), and the estimate is taken at every layer; a
logistic regression on the per-layer LIDs is the detector.

Representations (one LID column each): the global-average-pooled output of every gated layer after gating
(``LayerPath.pooled``), the penultimate features and the logits. Pooled rather than flattened feature maps:
the path API exposes them without hooks, they are the representation the Mahalanobis baseline uses (Lee et
al. 2018, whose code also estimates LID on pooled features), and distances in a few hundred dimensions are
cheap. Flattened maps keep spatial detail that pooling averages away, so this can be somewhat weaker than
Ma et al.'s flattened-activation LID.

Two departures from the reference code, both to make the detector deployable: the clean minibatch is drawn
from the featurizer's clean *training* reference images (the reference code draws it from the test batch
that also holds each adversarial image's own clean source), and the same random minibatch serves every
block of ``minibatch`` consecutive inputs of one :meth:`LIDFeaturizer.transform` call, with a generator
re-seeded at each call, so that features are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from torch import Tensor

from ..models import DecoupledNet
from .base import FeatureDetector
from .registry import DetectorEntry, register_detector, register_featurizer

GROUP = "lid"


def lid_mle(x: Tensor | np.ndarray, reference: Tensor | np.ndarray, k: int) -> np.ndarray:
    """Maximum-likelihood LID of each row of ``x`` from its ``k`` nearest neighbours in ``reference``.

    Parameters
    ----------
    x : array of shape (N, D), the query points (not themselves in ``reference``: a neighbour at distance 0
        would make the estimate degenerate).
    reference : array of shape (M, D) with M >= k, the points neighbours are drawn from.
    k : int >= 1, number of nearest neighbours.

    Returns
    -------
    ndarray of shape (N,), LID estimates >= 0. A point whose k nearest distances are all equal carries no
    dimension information; its estimate is set to 0 instead of infinity.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    reference = torch.as_tensor(reference, dtype=torch.float64)
    if x.ndim != 2 or reference.ndim != 2 or x.shape[1] != reference.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and reference {tuple(reference.shape)} must be (N, D) and (M, D)")
    if not 1 <= k <= len(reference):
        raise ValueError(f"k={k} must be in [1, {len(reference)}] (the number of reference points)")
    r = torch.cdist(x, reference).topk(k, dim=1, largest=False).values.clamp_min(1e-12)  # ascending
    mean_log = torch.log(r / r[:, -1:]).mean(dim=1)  # <= 0
    lid = torch.where(mean_log < 0, -1.0 / mean_log.clamp(max=-1e-300), torch.zeros_like(mean_log))
    return lid.numpy()


class LIDFeaturizer:
    """Per-layer LID of each input against random minibatches of clean reference images.

    Parameters
    ----------
    model : the classifier; ``model.forward_path`` gives the representations.
    k : int >= 1, nearest neighbours per estimate (reference default 20).
    minibatch : int > k, clean reference images per random minibatch (reference default 100).
    seed : int, seed of the minibatch draws (re-seeded at every :meth:`transform`).
    batch_size : int >= 1, images per forward pass.

    Attributes
    ----------
    groups : ``"lid"`` for each column after :meth:`fit`.
    names : ``"lid.<layer>"`` for each column: the gated layers, ``penultimate`` and ``logits``.
    reference_ : list of Tensor (M, D_l), the reference images' representation at each layer.
    """

    def __init__(
        self, model: DecoupledNet, *, k: int = 20, minibatch: int = 100, seed: int = 0, batch_size: int = 500
    ) -> None:
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        if minibatch <= k:
            raise ValueError(f"minibatch={minibatch} must be > k={k}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model, self.k, self.minibatch, self.seed, self.batch_size = model, k, minibatch, seed, batch_size
        self.groups: list[str] = []
        self.names: list[str] = []

    @torch.no_grad()
    def _representations(self, images: Tensor) -> list[Tensor]:
        self.model.eval()
        device = next(self.model.parameters()).device
        per_layer: list[list[Tensor]] = []
        for start in range(0, len(images), self.batch_size):
            out = self.model.forward_path(images[start : start + self.batch_size].to(device))
            reps = [layer.pooled for layer in out.layers] + [out.penultimate, out.logits]
            per_layer = per_layer or [[] for _ in reps]
            for acc, r in zip(per_layer, reps, strict=True):
                acc.append(r.flatten(1).cpu())
        return [torch.cat(acc) for acc in per_layer]

    def fit(self, images: Tensor, labels: Tensor) -> LIDFeaturizer:
        """Keep the representations of clean ``images`` (M, C, H, W) in [0, 1], M >= ``minibatch``."""
        if len(images) < self.minibatch:
            raise ValueError(f"LID needs at least minibatch={self.minibatch} reference images, got {len(images)}")
        self.reference_ = self._representations(images)
        self.names = [f"lid.{name}" for name in self.model.layer_names] + ["lid.penultimate", "lid.logits"]
        self.groups = [GROUP] * len(self.names)
        return self

    def transform(self, images: Tensor) -> np.ndarray:
        """(N, L + 2) LIDs of ``images`` (N, C, H, W) in [0, 1], columns as :attr:`names`."""
        if not hasattr(self, "reference_"):
            raise NotFittedError("LIDFeaturizer.transform called before fit")
        reps = self._representations(images) if len(images) else []
        out = np.zeros((len(images), len(self.names)))
        gen = torch.Generator().manual_seed(self.seed)
        n_ref = len(self.reference_[0])
        for start in range(0, len(images), self.minibatch):
            idx = torch.randperm(n_ref, generator=gen)[: self.minibatch]
            stop = start + self.minibatch
            for j, (rep, ref) in enumerate(zip(reps, self.reference_, strict=True)):
                out[start:stop, j] = lid_mle(rep[start:stop], ref[idx], self.k)
        return out


class LIDDetector(FeatureDetector):
    """Classifier on the per-layer LIDs of :class:`LIDFeaturizer` (the ``"lid"`` columns of X).

    Parameters
    ----------
    classifier, target_fpr, C, n_estimators, max_depth, random_state : see :class:`FeatureDetector`.
    ``fit`` may be given ``groups``; then only the ``"lid"`` columns are read, else all of them.
    """

    def _columns(self, n_features: int, groups: Sequence[str] | None) -> np.ndarray:
        if groups is None:
            return np.arange(n_features)
        cols = np.flatnonzero(np.asarray(groups) == GROUP)
        if len(cols) == 0:
            raise ValueError(f"no column of X belongs to group {GROUP!r}")
        return cols


register_featurizer("lid", lambda ctx: LIDFeaturizer(ctx.model, seed=ctx.seed, batch_size=ctx.batch_size))
register_detector(
    DetectorEntry(
        "lid",
        "lid",
        lambda fpr, seed: LIDDetector(classifier="logreg", target_fpr=fpr, random_state=seed),
        "LID (Ma et al. 2018): logistic regression on per-layer MLE LIDs (k=20, random clean minibatches of 100), "
        "noisy clean images as extra negatives",
        noisy_negatives=True,
    )
)
