"""Differentiable stand-ins for a fitted path detector's score (Tramer et al. 2020, section 4: loss surrogates).

A surrogate maps the path-feature rows that :func:`detector.features.path_features` computes (torch, with
gradients) to the *logit* of the detector's adversarial score. For a logistic-regression detector it is
the detector itself written in torch (exact). Tree ensembles (random forest, gradient boosting) are
piecewise constant, so an attacker fits a smooth model to their scores and follows its gradient; the real
detector still decides success.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from ..detectors import FeatureDetector
from ..detectors.scorers import IdentityScorer, LinearScorer, TreeScorer

log = logging.getLogger(__name__)

SURROGATE_KINDS = ("linear", "mlp")
_CLIP = 1e-4  # scores are clipped to [_CLIP, 1 - _CLIP] before taking logits


def _logit(p: float | Tensor) -> float | Tensor:
    if isinstance(p, Tensor):
        p = p.clamp(_CLIP, 1 - _CLIP)
        return torch.log(p) - torch.log1p(-p)
    p = min(max(float(p), _CLIP), 1 - _CLIP)
    return float(np.log(p) - np.log1p(-p))


class DetectorSurrogate(nn.Module):
    """Base: ``logit(X)`` for path-feature rows X (N, F) (all F columns; the surrogate selects its own).

    Attributes
    ----------
    exact : True when ``sigmoid(logit(X))`` equals the detector's score (up to float rounding).
    threshold_logit : the detector's calibrated threshold on the logit scale.
    """

    exact: bool = False

    def __init__(self, columns: np.ndarray, threshold: float) -> None:
        super().__init__()
        self.register_buffer("columns", torch.as_tensor(np.asarray(columns), dtype=torch.long))
        self.threshold_logit = _logit(threshold)

    def logit(self, X: Tensor) -> Tensor:
        raise NotImplementedError

    def score(self, X: Tensor) -> Tensor:
        """Tensor (N,) in [0, 1]: the surrogate's adversarial score."""
        return torch.sigmoid(self.logit(X))

    def describe(self) -> dict:
        return {"kind": type(self).__name__, "exact": self.exact}


class LinearSurrogate(DetectorSurrogate):
    """``((X[:, columns] - mean) / scale) @ coef + intercept``: a logistic-regression detector, exactly."""

    exact = True

    def __init__(self, scorer: LinearScorer, columns: np.ndarray, threshold: float) -> None:
        super().__init__(columns, threshold)
        for name in ("mean", "scale", "coef"):
            self.register_buffer(name, torch.as_tensor(np.asarray(getattr(scorer, name)), dtype=torch.float64))
        self.intercept = float(scorer.intercept)

    def logit(self, X: Tensor) -> Tensor:
        x = X[:, self.columns].to(torch.float64)
        return (((x - self.mean) / self.scale) @ self.coef + self.intercept).to(X.dtype)


class IdentitySurrogate(DetectorSurrogate):
    """The one selected feature is the score."""

    exact = True

    def logit(self, X: Tensor) -> Tensor:
        return _logit(X[:, self.columns[0]])


class FittedSurrogate(DetectorSurrogate):
    """A smooth model fitted to a non-differentiable detector's scores on example feature rows.

    ``kind="linear"``: logistic regression; ``kind="mlp"``: one hidden layer. Both are trained with binary
    cross-entropy against the detector's scores as soft labels, on standardised columns.
    """

    def __init__(
        self, columns: np.ndarray, threshold: float, net: nn.Module, mean: Tensor, scale: Tensor, kind: str
    ) -> None:
        super().__init__(columns, threshold)
        self.net = net
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)
        self.kind = kind

    def logit(self, X: Tensor) -> Tensor:
        x = (X[:, self.columns].to(self.mean.dtype) - self.mean) / self.scale
        return self.net(x).squeeze(1).to(X.dtype)

    def describe(self) -> dict:
        return {**super().describe(), "fitted": self.kind}


def fit_surrogate(
    detector: FeatureDetector,
    X: np.ndarray,
    *,
    kind: str = "mlp",
    hidden: int = 64,
    epochs: int = 400,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> FittedSurrogate:
    """Fit a :class:`FittedSurrogate` to ``detector``'s scores on feature rows X (n_samples, n_features).

    X should hold clean and adversarial rows (the detector's own training rows are a good choice), so that
    the surrogate sees both sides of the detector's threshold.
    """
    if kind not in SURROGATE_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {SURROGATE_KINDS}")
    if len(X) < 2:
        raise ValueError(f"fitting a surrogate needs at least 2 feature rows, got {len(X)}")
    cols = np.asarray(detector.columns_)
    target = torch.as_tensor(np.clip(detector.decision_function(X), _CLIP, 1 - _CLIP), dtype=torch.float32)
    x = torch.as_tensor(np.asarray(X)[:, cols], dtype=torch.float32)
    mean, scale = x.mean(0), x.std(0)
    scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
    x = (x - mean) / scale
    gen = torch.Generator().manual_seed(seed)
    if kind == "linear":
        net: nn.Module = nn.Linear(x.shape[1], 1)
    else:
        net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, 1))
    with torch.no_grad():
        for p in net.parameters():  # seeded init, independent of the global RNG
            p.copy_(torch.randn(p.shape, generator=gen) * (0.01 if p.ndim == 1 else 1.0 / np.sqrt(p.shape[-1])))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(epochs):  # full batch: the rows are few (thousands) and the net is small
        opt.zero_grad()
        loss = loss_fn(net(x).squeeze(1), target)
        loss.backward()
        opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return FittedSurrogate(cols, float(detector.threshold_), net, mean, scale, kind)


def build_surrogate(
    detector: FeatureDetector, X_fit: np.ndarray | None = None, *, kind: str = "mlp", seed: int = 0
) -> DetectorSurrogate:
    """The exact surrogate of a linear (or identity) detector; a fitted one for tree ensembles.

    X_fit : feature rows to fit on; required for tree-ensemble detectors.
    """
    scorer = getattr(detector, "scorer_", None)  # the ensemble has none: it is fitted like a tree ensemble
    if scorer is None or isinstance(scorer, TreeScorer):
        if X_fit is None:
            raise ValueError(
                "a detector that is not linear in its features needs X_fit, feature rows to fit its surrogate on"
            )
        return fit_surrogate(detector, X_fit, kind=kind, seed=seed)
    if isinstance(scorer, LinearScorer):
        return LinearSurrogate(scorer, detector.columns_, float(detector.threshold_))
    if isinstance(scorer, IdentityScorer):
        return IdentitySurrogate(detector.columns_, float(detector.threshold_))
    raise ValueError(f"no surrogate for a {type(scorer).__name__}")


def surrogate_agreement(surrogate: DetectorSurrogate, detector: FeatureDetector, X: np.ndarray) -> float:
    """Spearman rank correlation between the surrogate's and the detector's scores on rows X."""
    with torch.no_grad():
        s = surrogate.logit(torch.as_tensor(X, dtype=torch.float64)).numpy()
    d = detector.decision_function(X)
    if np.ptp(s) == 0 or np.ptp(d) == 0:
        return float("nan")
    return float(spearmanr(s, d).statistic)
