"""Kernel density + Bayesian uncertainty detector, after Feinman et al., 2017 ("Detecting adversarial
samples from artifacts"; code as in github.com/xingjunm/lid_adversarial_subspace_detection).

``kd``: log-density of the input's penultimate features under a Gaussian KDE of the clean training
images of its *predicted* class (training images grouped by true label), with the normalising constant of
sklearn's ``KernelDensity.score_samples``. Bandwidth: Feinman et al. tuned one per dataset by
cross-validation; here it is chosen in :meth:`KDBUFeaturizer.fit` among ``BANDWIDTH_FACTORS`` times the
median distance of a reference feature to its nearest same-class neighbour, by the held-out
log-likelihood of a 2-fold split of each class (unsupervised, clean training images only), unless given.

``bu``: Monte Carlo dropout variance, the mean over classes of the variance over T stochastic softmax
outputs (the reference code's ``var(axis=0).mean(axis=1)``). The models have no dropout, so dropout
(rate 0.5, inverted scaling) is applied at test time only to the penultimate features before the final
linear classifier (``model.classifier``), T = 50 samples: the place and rate of the dropout before the
last dense layer of Feinman et al.'s networks. Only the head is resampled, so the T samples cost T small
matrix products, not T forward passes. The T dropout masks (T thinned heads) are drawn once per
:meth:`KDBUFeaturizer.transform` from a generator seeded with ``seed`` and shared by all inputs, so an
input's ``bu`` does not depend on the batch it comes in.

The detector is a logistic regression on the standardised [kd, bu].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from torch import Tensor, nn

from ..models import DecoupledNet
from .base import FeatureDetector
from .registry import DetectorEntry, register_detector, register_featurizer

GROUPS = ("kd", "bu")
BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def kde_log_density(x: Tensor | np.ndarray, reference: Tensor | np.ndarray, bandwidth: float) -> Tensor:
    """(N,) log of the Gaussian KDE ``(1/M) sum_j N(x; r_j, h^2 I)`` at each row of ``x`` (N, D),
    with ``reference`` (M, D), M >= 1, and bandwidth h > 0 (equals sklearn's ``score_samples``)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    reference = torch.as_tensor(reference, dtype=torch.float64)
    h2 = float(bandwidth) ** 2
    sq = torch.cdist(x, reference).square()
    return torch.logsumexp(-sq / (2 * h2), dim=1) - np.log(len(reference)) - 0.5 * x.shape[1] * np.log(2 * np.pi * h2)


def select_bandwidth(
    features: Tensor, labels: Tensor, factors: Sequence[float] = BANDWIDTH_FACTORS, seed: int = 0
) -> float:
    """Bandwidth with the best held-out log-likelihood of class-conditional KDEs (2-fold per class).

    Candidates are ``factors`` times the median distance of a feature to its nearest same-class neighbour.
    ``features`` (N, D) float, ``labels`` (N,) int; every class needs >= 2 rows.
    """
    gen = torch.Generator().manual_seed(seed)
    halves, nn_dist = [], []
    for c in torch.unique(labels):
        f = features[labels == c].double()
        if len(f) < 2:
            raise ValueError(f"bandwidth selection needs >= 2 reference images of class {int(c)}, got {len(f)}")
        d = torch.cdist(f, f).fill_diagonal_(float("inf"))
        nn_dist.append(d.min(dim=1).values)
        perm = torch.randperm(len(f), generator=gen)
        halves.append((f[perm[: len(f) // 2]], f[perm[len(f) // 2 :]]))
    base = float(torch.cat(nn_dist).median().clamp_min(1e-12))

    def heldout(h: float) -> float:
        return sum(float(kde_log_density(b, a, h).sum() + kde_log_density(a, b, h).sum()) for a, b in halves)

    return max((f * base for f in factors), key=heldout)


class KDBUFeaturizer:
    """[kd, bu] of each input (see the module docstring).

    Parameters
    ----------
    model : the classifier; needs ``model.classifier``, the linear layer from penultimate features to logits.
    bandwidth : float > 0 or None (chosen in :meth:`fit` by held-out likelihood).
    dropout : float in (0, 1), drop rate on the penultimate features.
    mc_samples : int >= 2, the T stochastic passes of the head.
    seed : int, seed of the dropout masks (re-seeded at every :meth:`transform`) and of the bandwidth split.
    batch_size : int >= 1, images per forward pass.

    Attributes
    ----------
    groups, names : ``["kd", "bu"]``.
    bandwidth_ : float, the bandwidth used.
    reference_ : list of Tensor (M_c, D), penultimate features of the reference images of each class.
    """

    def __init__(
        self,
        model: DecoupledNet,
        *,
        bandwidth: float | None = None,
        dropout: float = 0.5,
        mc_samples: int = 50,
        seed: int = 0,
        batch_size: int = 500,
    ) -> None:
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"bandwidth={bandwidth} must be > 0 or None")
        if not 0 < dropout < 1:
            raise ValueError(f"dropout={dropout} must be in (0, 1)")
        if mc_samples < 2:
            raise ValueError(f"mc_samples={mc_samples} must be >= 2")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not isinstance(getattr(model, "classifier", None), nn.Linear):
            raise ValueError(f"KD+BU needs model.classifier, the final nn.Linear; {type(model).__name__} has none")
        self.model, self.bandwidth, self.dropout, self.mc_samples = model, bandwidth, dropout, mc_samples
        self.seed, self.batch_size = seed, batch_size
        self.groups: list[str] = []
        self.names: list[str] = []

    @torch.no_grad()
    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(penultimate (N, D), logits (N, K)) on the model's device."""
        self.model.eval()
        device = next(self.model.parameters()).device
        outs = [
            self.model.forward_path(images[s : s + self.batch_size].to(device))
            for s in range(0, len(images), self.batch_size)
        ]
        return torch.cat([o.penultimate for o in outs]), torch.cat([o.logits for o in outs])

    def fit(self, images: Tensor, labels: Tensor) -> KDBUFeaturizer:
        """Keep the penultimate features of clean ``images`` (N, C, H, W) in [0, 1] by true ``labels``."""
        feats, logits = self._forward(images)
        with torch.no_grad():
            head = self.model.classifier(feats)
        if not torch.allclose(head, logits, atol=1e-4, rtol=1e-4):
            raise ValueError("model.classifier(penultimate) does not reproduce the logits; cannot apply dropout there")
        feats, labels = feats.cpu(), torch.as_tensor(labels).cpu()
        missing = sorted(set(range(self.model.num_classes)) - set(labels.tolist()))
        if missing:
            raise ValueError(f"no reference images of classes {missing}")
        self.reference_ = [feats[labels == c].double() for c in range(self.model.num_classes)]
        self.bandwidth_ = (
            float(self.bandwidth) if self.bandwidth is not None else select_bandwidth(feats, labels, seed=self.seed)
        )
        self.groups, self.names = list(GROUPS), list(GROUPS)
        return self

    @torch.no_grad()
    def transform(self, images: Tensor) -> np.ndarray:
        """(N, 2) [kd, bu] of ``images`` (N, C, H, W) in [0, 1]."""
        if not hasattr(self, "reference_"):
            raise NotFittedError("KDBUFeaturizer.transform called before fit")
        if len(images) == 0:
            return np.zeros((0, len(GROUPS)))
        feats, logits = self._forward(images)
        pred, feats_cpu = logits.argmax(1).cpu(), feats.cpu()
        kd = torch.zeros(len(images), dtype=torch.float64)
        for c, ref in enumerate(self.reference_):
            rows = pred == c
            if rows.any():
                kd[rows] = kde_log_density(feats_cpu[rows], ref, self.bandwidth_)
        gen = torch.Generator(device=feats.device).manual_seed(self.seed)
        keep = 1.0 - self.dropout
        # T thinned heads, the same for every input: an input's bu does not depend on its batch
        masks = torch.bernoulli(
            torch.full((self.mc_samples, 1, feats.shape[1]), keep, device=feats.device), generator=gen
        )
        bu = []
        for s in range(0, len(feats), self.batch_size):
            f = feats[s : s + self.batch_size]
            probs = self.model.classifier(f * masks / keep).softmax(-1)  # (T, n, K)
            bu.append(probs.var(dim=0, unbiased=False).mean(dim=-1).cpu().double())
        bu_all = torch.cat(bu) if bu else torch.zeros(0, dtype=torch.float64)
        return torch.stack([kd, bu_all], dim=1).numpy()


class KDBUDetector(FeatureDetector):
    """Classifier on the ``"kd"`` and ``"bu"`` columns of :class:`KDBUFeaturizer` (all columns when ``fit``
    gets no ``groups``). Parameters: see :class:`FeatureDetector`."""

    def _columns(self, n_features: int, groups: Sequence[str] | None) -> np.ndarray:
        if groups is None:
            return np.arange(n_features)
        cols = np.flatnonzero(np.isin(np.asarray(groups), GROUPS))
        if len(cols) == 0:
            raise ValueError(f"no column of X belongs to groups {GROUPS}")
        return cols


register_featurizer("kdbu", lambda ctx: KDBUFeaturizer(ctx.model, seed=ctx.seed, batch_size=ctx.batch_size))
register_detector(
    DetectorEntry(
        "kdbu",
        "kdbu",
        lambda fpr, seed: KDBUDetector(classifier="logreg", target_fpr=fpr, random_state=seed),
        "KD+BU (Feinman et al. 2017): logistic regression on the class-conditional kernel density of the "
        "penultimate features and the MC-dropout variance (dropout 0.5 on the penultimate features, T=50)",
    )
)
