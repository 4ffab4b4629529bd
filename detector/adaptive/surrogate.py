"""Differentiable stand-ins for a fitted path detector's score (Tramer et al. 2020, section 4: loss surrogates).

A surrogate maps the path-feature rows that :func:`detector.features.path_features` computes (torch, with
gradients) to the *logit* of the detector's adversarial score. For a logistic-regression detector it is
the detector itself written in torch (exact). Tree ensembles (random forest, gradient boosting) are
piecewise constant: :mod:`detector.adaptive.relaxation` builds smooth versions from their parameters, and
where none exists :class:`IterateSurrogate` is fitted to the real scores of the attack's own iterates. The
real detector always decides success.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from ..detectors import FeatureDetector
from ..detectors.scorers import LinearScorer

log = logging.getLogger(__name__)

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

    def anneal(self, progress: float) -> None:
        """Called by the attack with how far through it is, in [0, 1] (a temperature may follow it)."""

    def observe(self, X: Tensor, scores: np.ndarray) -> None:
        """Called by the attack with its iterates' feature rows and the real detector's scores of them."""

    def reset(self) -> None:
        """Called at the start of every batch: forget what the previous batch's iterates taught."""

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


class IterateSurrogate(DetectorSurrogate):
    """The generic fallback: a small network refitted on the attack's own iterates, labelled by the real
    detector's scores (Tramer et al. 2020, section 4).

    A surrogate fitted once on the detector's training rows only sees where the score saturates; this one
    learns the region the attack moves through. :meth:`observe` adds rows to a buffer (the latest
    ``buffer`` rows, with the clean rows always kept) and, every ``refit_every`` calls, trains for ``epochs``
    full-batch Adam steps from the current weights on binary cross-entropy against the real scores.

    Parameters
    ----------
    detector : the fitted detector (its ``columns_``, ``threshold_`` and ``decision_function``).
    X_clean : (n, n_features) clean rows to start from (standardisation and the first fit).
    hidden, buffer, refit_every, epochs, seed : see above.
    device : where the network, its rows and its fits live: the attacked model's device.
    """

    def __init__(
        self,
        detector: FeatureDetector,
        X_clean: np.ndarray,
        *,
        hidden: int = 64,
        buffer: int = 4000,
        refit_every: int = 2,
        epochs: int = 40,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(np.asarray(detector.columns_), float(detector.threshold_))
        if len(X_clean) < 2:
            raise ValueError(f"X_clean needs at least 2 rows, got {len(X_clean)}")
        self.hidden, self.buffer, self.refit_every, self.epochs, self.seed = hidden, buffer, refit_every, epochs, seed
        x = torch.as_tensor(np.asarray(X_clean)[:, self.columns.numpy()], dtype=torch.float32, device=device)
        self.columns = self.columns.to(device)
        scale = x.std(0)
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("scale", torch.where(scale > 1e-6, scale, torch.ones_like(scale)))
        clean = np.clip(detector.decision_function(np.asarray(X_clean, dtype=np.float64)), _CLIP, 1 - _CLIP)
        self._clean = (x, torch.as_tensor(clean, dtype=torch.float32, device=device))
        self.refits = 0
        self.reset()

    def reset(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        self.net = nn.Sequential(nn.Linear(len(self.mean), self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.01 if p.ndim == 1 else 1.0 / np.sqrt(p.shape[-1])))
        self.net.to(self.mean.device)
        self._opt = torch.optim.Adam(self.net.parameters(), lr=1e-2, weight_decay=1e-4)
        self._rows: list[tuple[Tensor, Tensor]] = []
        self._calls = 0
        self._fit(4 * self.epochs)

    def observe(self, X: Tensor, scores: np.ndarray) -> None:
        x = X.detach()[:, self.columns].float().to(self.mean.device)
        y = torch.as_tensor(np.clip(scores, _CLIP, 1 - _CLIP), dtype=torch.float32, device=x.device)
        self._rows.append((x, y))
        while sum(len(r[0]) for r in self._rows) > self.buffer and len(self._rows) > 1:
            self._rows.pop(0)
        self._calls += 1
        if self._calls % self.refit_every == 0:
            self._fit(self.epochs)

    def _fit(self, epochs: int) -> None:
        xs, ys = zip(*[self._clean, *self._rows], strict=True)
        x = (torch.cat(xs) - self.mean) / self.scale
        y = torch.cat(ys)
        self.net.train()
        with torch.enable_grad():
            for p in self.net.parameters():
                p.requires_grad_(True)
            for _ in range(epochs):
                self._opt.zero_grad()
                nn.functional.binary_cross_entropy_with_logits(self.net(x).squeeze(1), y).backward()
                self._opt.step()
            for p in self.net.parameters():
                p.requires_grad_(False)
        self.net.eval()
        self.refits += 1

    def logit(self, X: Tensor) -> Tensor:
        x = (X[:, self.columns].to(self.mean.dtype) - self.mean) / self.scale
        return self.net(x).squeeze(1).to(X.dtype)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "fitted": "on the attack's iterates",
            "refit_every": self.refit_every,
            "epochs": self.epochs,
            "buffer": self.buffer,
        }


def surrogate_agreement(surrogate: DetectorSurrogate, detector: FeatureDetector, X: np.ndarray) -> float:
    """Spearman rank correlation between the surrogate's and the detector's scores on rows X."""
    with torch.no_grad():
        s = surrogate.logit(torch.as_tensor(X, dtype=torch.float64, device=surrogate.columns.device)).cpu().numpy()
    d = detector.decision_function(X)
    if np.ptp(s) == 0 or np.ptp(d) == 0:
        return float("nan")
    return float(spearmanr(s, d).statistic)
