"""Feature squeezing detector, after Xu, Evans & Qi, NDSS 2018 (code: EvadeML-Zoo).

Each squeezer maps an image to a coarser one; an input whose prediction moves a lot under squeezing is
suspicious. The score is ``max_s ||softmax(f(x)) - softmax(f(s(x)))||_1 / 2`` in [0, 1] (the L1 distance of
two probability vectors is at most 2), and the detector thresholds it at the target FPR on clean
calibration images (classifier ``"identity"``: nothing is learned from adversarial examples).

Squeezers, written ``"bits:<b>"`` and ``"median:<s>"``:

- bit-depth reduction to b bits: ``round(x * (2^b - 1)) / (2^b - 1)``;
- median smoothing over an s x s window per channel, as ``scipy.ndimage.median_filter`` (which Xu et al.
  use) computes it: window offsets ``-(s // 2) .. s - 1 - s // 2``, the element of rank ``s*s // 2``
  (the upper median for even s), borders mirrored with the edge repeated (scipy's ``"reflect"``).

Squeezers are chosen as Xu et al. configure their joint detector: by detection on validation data.
:class:`SqueezeFeaturizer` (``squeezers=None``) computes every *candidate* on each image: the bit depths 1..5
and the 2x2 and 3x3 medians (3x3 for grey images only) that change the predicted class of at most
``max_flip`` (2%) of up to 1000 clean reference images (squeezers must keep clean accuracy; 5 bits if no bit
depth passes, 2x2 always). :class:`SqueezeDetector` with ``classifier="select"`` (the default) then picks
the combination, at most one bit depth plus any medians, whose joint score (the max over its squeezers)
has the highest AUROC on the fitting rows (validation images and their adversarial versions), and the
evaluation report names the squeezers it picked. Nothing else is learned: the score is a fixed statistic.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from .base import FeatureDetector
from .registry import DetectorEntry, register_detector, register_featurizer
from .scorers import MaxScorer

SQUEEZE, SCORE = "squeeze", "score"
SELECTION_IMAGES = 1000


def reduce_bit_depth(x: Tensor, bits: int) -> Tensor:
    """Images (N, C, H, W) in [0, 1] quantised to ``bits`` in [1, 8] bits per channel."""
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


def _symmetric_index(n: int, before: int, after: int) -> Tensor:
    i = torch.arange(-before, n + after)
    i = torch.where(i < 0, -i - 1, i)
    return torch.where(i >= n, 2 * n - i - 1, i)


def median_smooth(x: Tensor, size: int) -> Tensor:
    """Per-channel ``size`` x ``size`` median of images (N, C, H, W), as ``scipy.ndimage.median_filter``
    with ``size=(1, 1, size, size)`` and ``mode="reflect"``; ``size`` in [2, min(H, W)]."""
    before, after = size // 2, size - 1 - size // 2
    h, w = x.shape[-2:]
    p = x.index_select(-2, _symmetric_index(h, before, after).to(x.device))
    p = p.index_select(-1, _symmetric_index(w, before, after).to(x.device))
    windows = p.unfold(-2, size, 1).unfold(-2, size, 1)  # (N, C, H, W, size, size)
    return windows.flatten(-2).sort(dim=-1).values[..., (size * size) // 2]


def parse_squeezer(spec: str) -> tuple[str, int]:
    """``"bits:5"`` -> ("bits", 5); ``"median:2"`` -> ("median", 2). Raises ValueError on anything else."""
    kind, _, value = spec.partition(":")
    if kind not in ("bits", "median") or not value.isdigit():
        raise ValueError(f"squeezer={spec!r} must look like 'bits:<1-8>' or 'median:<size>=2+'")
    v = int(value)
    if (kind == "bits" and not 1 <= v <= 8) or (kind == "median" and v < 2):
        raise ValueError(f"squeezer={spec!r}: bits must be in [1, 8], median size >= 2")
    return kind, v


def squeeze(x: Tensor, spec: str) -> Tensor:
    """Apply the squeezer ``spec`` (see :func:`parse_squeezer`) to images (N, C, H, W) in [0, 1]."""
    kind, v = parse_squeezer(spec)
    return reduce_bit_depth(x, v) if kind == "bits" else median_smooth(x, v)


class SqueezeFeaturizer:
    """Per-squeezer prediction change and their maximum (the feature-squeezing score).

    Parameters
    ----------
    model : the classifier, ``model(x)`` -> logits for x (N, C, H, W) in [0, 1].
    squeezers : sequence of squeezer specs, or None to choose them in :meth:`fit` (module docstring).
    max_flip : float in [0, 1), the share of clean predictions a default squeezer may change.
    batch_size : int >= 1, images per forward pass.

    Attributes
    ----------
    groups : ``"squeeze"`` for each squeezer's column, then ``"score"`` for the max column.
    names : ``"squeeze.<spec>"`` ..., ``"score"``.
    squeezers_ : the squeezers used.
    flip_rates_ : {spec: share of clean reference predictions it changed}, for the candidates tried.
    """

    def __init__(
        self, model: nn.Module, *, squeezers: Sequence[str] | None = None, max_flip: float = 0.02, batch_size: int = 500
    ) -> None:
        if squeezers is not None:
            squeezers = tuple(squeezers)
            if not squeezers:
                raise ValueError("squeezers=() must name at least one squeezer (or None for the defaults)")
            for spec in squeezers:
                parse_squeezer(spec)
        if not 0 <= max_flip < 1:
            raise ValueError(f"max_flip={max_flip} must be in [0, 1)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model, self.squeezers, self.max_flip, self.batch_size = model, squeezers, max_flip, batch_size
        self.groups: list[str] = []
        self.names: list[str] = []

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @torch.no_grad()
    def _flip_rate(self, images: Tensor, pred: Tensor, spec: str) -> float:
        changed = sum(
            int(
                (
                    self.model(squeeze(images[s : s + self.batch_size], spec)).argmax(1)
                    != pred[s : s + self.batch_size]
                ).sum()
            )
            for s in range(0, len(images), self.batch_size)
        )
        self.flip_rates_[spec] = changed / len(images)
        return self.flip_rates_[spec]

    @torch.no_grad()
    def fit(self, images: Tensor, labels: Tensor) -> SqueezeFeaturizer:
        """Keep the candidate squeezers that keep clean predictions on ``images`` (N, C, H, W) in [0, 1]
        (labels are unused), or take the given ones; sets the column layout."""
        self.model.eval()
        self.flip_rates_: dict[str, float] = {}
        if self.squeezers is not None:
            self.squeezers_ = self.squeezers
        else:
            x = images[:SELECTION_IMAGES].to(self._device())
            if len(x) == 0:
                raise ValueError("choosing the default squeezers needs clean reference images, got none")
            step = self.batch_size
            pred = torch.cat([self.model(x[s : s + step]).argmax(1) for s in range(0, len(x), step)])
            bits = [f"bits:{b}" for b in range(1, 6) if self._flip_rate(x, pred, f"bits:{b}") <= self.max_flip]
            medians = ["median:2"]
            if x.shape[1] == 1 and self._flip_rate(x, pred, "median:3") <= self.max_flip:
                medians.append("median:3")
            self.squeezers_ = (*(bits or ["bits:5"]), *medians)
        self.groups = [SQUEEZE] * len(self.squeezers_) + [SCORE]
        self.names = [f"squeeze.{s}" for s in self.squeezers_] + [SCORE]
        return self

    @torch.no_grad()
    def transform(self, images: Tensor) -> np.ndarray:
        """(N, S + 1) L1 distances / 2 in [0, 1] between the softmax of each image and of each squeezed
        version, then their maximum; ``images`` (N, C, H, W) in [0, 1]."""
        if not hasattr(self, "squeezers_"):
            raise NotFittedError("SqueezeFeaturizer.transform called before fit")
        self.model.eval()
        device = self._device()
        rows = []
        for s in range(0, len(images), self.batch_size):
            x = images[s : s + self.batch_size].to(device)
            p = self.model(x).softmax(1)
            d = torch.stack([(self.model(squeeze(x, q)).softmax(1) - p).abs().sum(1) / 2 for q in self.squeezers_], 1)
            rows.append(torch.cat([d, d.amax(1, keepdim=True)], 1).clamp(0, 1).cpu().double())
        return torch.cat(rows).numpy() if rows else np.zeros((0, len(self.names)))


class SqueezeDetector(FeatureDetector):
    """Feature squeezing. ``classifier="select"`` (default): the joint score of the squeezer combination that
    detects best on the fitting rows (module docstring); ``"identity"``: the ``"score"`` column (max over all
    the featurizer's squeezers); another classifier learns from the per-squeezer ``"squeeze"`` columns.
    Without ``groups`` in ``fit`` all columns are read. Parameters: see :class:`FeatureDetector`."""

    def __init__(
        self,
        classifier: str = "select",
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

    def _check_params(self) -> None:
        if self.classifier == "select":
            self.classifier = "identity"  # validated as identity, restored below
            try:
                super()._check_params()
            finally:
                self.classifier = "select"
            return
        super()._check_params()

    def _columns(self, n_features: int, groups: Sequence[str] | None) -> np.ndarray:
        if groups is None:
            return np.arange(n_features)
        want = SCORE if self.classifier == "identity" else SQUEEZE
        cols = np.flatnonzero(np.asarray(groups) == want)
        if len(cols) == 0:
            raise ValueError(f"no column of X belongs to group {want!r}")
        return cols

    def fit(
        self, X, y, *, groups: Sequence[str] | None = None, X_calibration=None, names: Sequence[str] | None = None
    ) -> SqueezeDetector:
        if self.classifier != "select":
            return super().fit(X, y, groups=groups, X_calibration=X_calibration)
        self._check_params()
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
        if not np.array_equal(np.unique(y), [0, 1]):
            raise ValueError(f"y must hold both labels 0 (clean) and 1 (adversarial), got {np.unique(y).tolist()}")
        cols = self._columns(X.shape[1], groups)
        names = list(names) if names is not None else [f"column {c}" for c in range(X.shape[1])]
        bits = [c for c in cols if "bits" in names[c]]
        medians = [c for c in cols if c not in bits]
        best, best_auc = None, -1.0
        for b in [None, *bits]:
            for r in range(0, len(medians) + 1):
                for med in itertools.combinations(medians, r):
                    subset = ([b] if b is not None else []) + list(med)
                    if not subset:
                        continue
                    auc = roc_auc_score(y, X[:, subset].max(1))
                    if auc > best_auc:
                        best, best_auc = subset, auc
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.array([0, 1])
        self.columns_ = np.asarray(best, dtype=np.int64)
        self.selected_ = [names[c].removeprefix("squeeze.") for c in best]
        self.selection_auroc_ = float(best_auc)
        self.scorer_ = MaxScorer()
        self.calibrate(X[y == 0] if X_calibration is None else X_calibration)
        return self


register_featurizer("squeeze", lambda ctx: SqueezeFeaturizer(ctx.model, batch_size=ctx.batch_size))
register_detector(
    DetectorEntry(
        "squeeze",
        "squeeze",
        lambda fpr, seed: SqueezeDetector(target_fpr=fpr, random_state=seed),
        "feature squeezing (Xu et al. 2018): max L1 change of the softmax over the squeezers picked by detection on "
        "the validation fitting images (candidates: bit depths and medians that keep 98% of clean predictions)",
    )
)
