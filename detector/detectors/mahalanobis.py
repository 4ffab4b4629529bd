"""Mahalanobis detector, after Lee et al., NeurIPS 2018 (github.com/pokaxpoka/deep_Mahalanobis_detector).

At each chosen layer, class-conditional Gaussians with one tied covariance are fitted to the
global-average-pooled features of clean training images (true labels). The layer's confidence score is

    M_l(x) = max_c  -1/2 (f_l(x) - mu_c)^T Sigma^+ (f_l(x) - mu_c)

taken after input pre-processing: ``x' = x + eps * sign(grad_x M_l(x))`` (one step that increases the
score; pixels whose gradient is exactly 0 move by -eps, as ``torch.ge`` makes them in the reference code),
without clipping to [0, 1], as in the reference. eps is a step in [0, 1] pixel space (normalisation is
inside the model); the reference divides its sign step on normalised inputs by the channel std, which is
the same pixel-space step, so its magnitudes carry over unchanged.

Layers: the last gated layer of every stage (``"stages"``, Lee et al. use each stage's output; for the
ResNets this is the stage's last residual branch, the block output after the addition is not exposed) or
every gated layer (``"all"``), plus the penultimate features (for the ResNets these are the pooled output
of the last block, Lee et al.'s last feature).

Noise magnitude: the featurizer emits one block of per-layer scores for each magnitude of a small grid
(the reference's [0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01] without 0.0014), group ``"noise=<eps>"``;
:class:`MahalanobisDetector` picks the block whose logistic regression has the best cross-validated
AUROC on its fitting data (the reference picks it on a validation split) and fits on that block.
The featurizer's cost therefore covers the whole grid: one forward pass and L backward passes, then (M - 1) L
perturbed passes for M magnitudes and L layers; a deployed detector needs only its chosen magnitude. A
perturbed pass is scored at one layer only, so it stops once that layer has run (only the penultimate
layer's passes run the whole network): the scores are those of full passes, at less cost. ``pathguard
evaluate`` featurizes the rows it only scores (calibration, evaluation) at the magnitudes its fits chose on
the fitting rows (``transform(noise=...)``; the other columns NaN, never read), so the scoring cost it reports
is that of those magnitudes, not of the whole grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_X_y
from torch import Tensor

from ..models import DecoupledNet, PathOutput
from .base import FeatureDetector
from .registry import DetectorEntry, register_detector, register_featurizer

log = logging.getLogger(__name__)

NOISE_GRID = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01)
LAYERS = ("stages", "all")


def noise_group(eps: float) -> str:
    """Group name of the columns computed with noise magnitude ``eps``, e.g. ``"noise=0.001"``."""
    return f"noise={float(eps):g}"


def class_gaussians(
    features: Tensor | np.ndarray, labels: Tensor | np.ndarray, n_classes: int
) -> tuple[Tensor, Tensor]:
    """Class means and the precision of the tied covariance (maximum likelihood, as sklearn's
    ``EmpiricalCovariance``): ``Sigma = (1/N) sum_i (f_i - mu_{y_i})(f_i - mu_{y_i})^T``.

    Parameters
    ----------
    features : array (N, D); labels : int array (N,) in [0, n_classes).

    Returns
    -------
    means : Tensor (n_classes, D) float64; precision : Tensor (D, D) float64, the pseudo-inverse of Sigma
    (gated-off channels make Sigma singular).
    """
    f = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(y, minlength=n_classes)
    if (counts == 0).any():
        raise ValueError(f"no reference features of classes {torch.flatnonzero(counts == 0).tolist()}")
    means = torch.zeros(n_classes, f.shape[1], dtype=torch.float64).index_add_(0, y, f) / counts[:, None]
    centred = f - means[y]
    cov = centred.T @ centred / len(f)
    return means, torch.linalg.pinv(cov, hermitian=True)


def mahalanobis_score(features: Tensor | np.ndarray, means: Tensor, precision: Tensor) -> Tensor:
    """(N,) confidence score ``max_c -1/2 (f - mu_c)^T P (f - mu_c)`` of features (N, D); <= 0.

    Differentiable in ``features`` (the pre-processing step needs its gradient).
    """
    f = torch.as_tensor(features).to(torch.float64)
    diff = f[:, None, :] - means[None]  # (N, K, D)
    return (-0.5 * torch.einsum("nkd,de,nke->nk", diff, precision, diff)).amax(dim=1)


def stage_end_layers(model: DecoupledNet, path_names: Sequence[str]) -> list[int]:
    """Positions (in ``forward_path(x).layers``) of the last gated layer of each stage.

    VGG records them in ``model.stage_ends``; otherwise stages are read from the path's layer names
    (``LayerPath.name``, e.g. ``"stage2.block0.conv1"``): a stage ends where the first name component changes.
    """
    ends = getattr(model, "stage_ends", None)
    if ends is not None:
        return list(ends)
    prefix = [name.split(".")[0] for name in path_names]
    return [i for i in range(len(prefix)) if i == len(prefix) - 1 or prefix[i + 1] != prefix[i]]


class MahalanobisFeaturizer:
    """Per-layer Mahalanobis confidence scores of each input, for every noise magnitude.

    Parameters
    ----------
    model : the classifier.
    noise : non-empty sequence of magnitudes >= 0 in [0, 1] pixel space.
    layers : ``"stages"`` or ``"all"`` gated layers (the penultimate features are always added).
    batch_size : int >= 1, images per forward pass.

    Attributes
    ----------
    groups : ``"noise=<eps>"`` of each column (M blocks of L columns, in the order of ``noise``).
    names : ``"<layer>@noise=<eps>"`` of each column.
    means_, precisions_ : per layer, Tensor (K, D_l) and (D_l, D_l) float64.
    """

    def __init__(
        self, model: DecoupledNet, *, noise: Sequence[float] = NOISE_GRID, layers: str = "stages", batch_size: int = 500
    ) -> None:
        noise = tuple(float(e) for e in noise)
        if not noise or min(noise) < 0 or len(set(noise)) != len(noise):
            raise ValueError(f"noise={list(noise)} must be distinct magnitudes >= 0, at least one")
        if layers not in LAYERS:
            raise ValueError(f"layers={layers!r} must be one of {LAYERS}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model, self.noise, self.layers, self.batch_size = model, noise, layers, batch_size
        self.groups: list[str] = []
        self.names: list[str] = []

    def _features(self, out: PathOutput) -> list[Tensor]:
        return [out.layers[i].pooled for i in self.layer_index_] + [out.penultimate]

    def fit(self, images: Tensor, labels: Tensor) -> MahalanobisFeaturizer:
        """Fit the class Gaussians on clean ``images`` (N, C, H, W) in [0, 1] with true ``labels`` (N,)."""
        self.model.eval()
        device = next(self.model.parameters()).device
        with torch.no_grad():
            path_names = [layer.name for layer in self.model.forward_path(images[:1].to(device)).layers]
        self.layer_index_ = (
            list(range(len(path_names))) if self.layers == "all" else stage_end_layers(self.model, path_names)
        )
        with torch.no_grad():
            chunks = [
                self._features(self.model.forward_path(images[s : s + self.batch_size].to(device)))
                for s in range(0, len(images), self.batch_size)
            ]
        fitted = [
            class_gaussians(torch.cat([c[j].cpu() for c in chunks]), labels, self.model.num_classes)
            for j in range(len(chunks[0]))
        ]
        self.means_ = [m.to(device) for m, _ in fitted]
        self.precisions_ = [p.to(device) for _, p in fitted]
        layer_names = [self.model.layer_names[i] for i in self.layer_index_] + ["penultimate"]
        self.groups = [noise_group(e) for e in self.noise for _ in layer_names]
        self.names = [f"{name}@{noise_group(e)}" for e in self.noise for name in layer_names]
        return self

    def _scores(self, out: PathOutput) -> list[Tensor]:
        return [
            mahalanobis_score(f, m, p)
            for f, m, p in zip(self._features(out), self.means_, self.precisions_, strict=True)
        ]

    def _batch(self, x: Tensor, noise: frozenset[float] | None = None) -> Tensor:
        """(n, M * L) scores of one batch; the magnitudes not in ``noise`` (when given) are NaN."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            clean = self._scores(self.model.forward_path(x))
            # sign of the gradient of the reference's loss, mean(-M_l); x' = x - eps * that sign
            steps = [
                torch.where(torch.autograd.grad(-s.sum(), x, retain_graph=j < len(clean) - 1)[0] >= 0, 1.0, -1.0)
                for j, s in enumerate(clean)
            ]
        cols = []
        with torch.no_grad():
            for eps in self.noise:
                if eps == 0.0:
                    cols += [s.detach() for s in clean]
                elif noise is not None and eps not in noise:
                    cols += [torch.full_like(s, float("nan")) for s in clean]
                else:
                    cols += [self._score_at(x.detach() - eps * step, j) for j, step in enumerate(steps)]
        return torch.stack(cols, dim=1)

    def _score_at(self, x: Tensor, j: int) -> Tensor:
        """Score ``j`` of ``x`` from a pass that stops once layer ``j``'s features exist: a perturbed input is
        scored at one layer only, so the layers after it need not run (the penultimate needs the whole pass).
        The stop changes nothing before it, so the score is the one a full pass gives."""
        if j == len(self.layer_index_):
            return self._scores(self.model.forward_path(x))[j]
        path = _PathUpTo(self.layer_index_[j])
        try:
            self.model._forward(self.model.normalize(x), path)
        except _LayerReached:
            pass
        else:  # pragma: no cover - the model records every gated layer it runs
            raise RuntimeError(f"the forward pass never reached gated layer {self.layer_index_[j]}")
        return mahalanobis_score(path[-1].pooled, self.means_[j], self.precisions_[j])

    def transform(self, images: Tensor, noise: Sequence[float] | None = None) -> np.ndarray:
        """(N, M * L) scores of ``images`` (N, C, H, W) in [0, 1], columns as :attr:`names`.

        noise : None, or the magnitudes to compute (the others' columns are NaN; noise 0 comes with the
            gradient pass, always): rows that a fitted detector only scores need its chosen magnitude alone.
        """
        if not hasattr(self, "means_"):
            raise NotFittedError("MahalanobisFeaturizer.transform called before fit")
        wanted = None if noise is None else frozenset(float(e) for e in noise)
        if wanted is not None and not wanted <= set(self.noise):
            raise ValueError(f"noise={sorted(wanted)} must be magnitudes of the featurizer's grid {list(self.noise)}")
        self.model.eval()
        device = next(self.model.parameters()).device
        blocks = [
            self._batch(images[s : s + self.batch_size].to(device), wanted).cpu()
            for s in range(0, len(images), self.batch_size)
        ]
        return torch.cat(blocks).numpy() if blocks else np.zeros((0, len(self.names)))


class _LayerReached(Exception):
    """Raised by :class:`_PathUpTo` to end a forward pass early."""


class _PathUpTo(list):
    """A path list (what ``DecoupledNet._forward`` records gated layers into) that ends the pass by raising
    :class:`_LayerReached` once gated layer ``last`` (0-based) has been recorded."""

    def __init__(self, last: int) -> None:
        super().__init__()
        self.last = last

    def append(self, layer) -> None:
        super().append(layer)
        if len(self) > self.last:
            raise _LayerReached


def _noise_of(group: str) -> float | None:
    return float(group[len("noise=") :]) if group.startswith("noise=") else None


class MahalanobisDetector(FeatureDetector):
    """Classifier on one noise magnitude's per-layer Mahalanobis scores.

    Parameters
    ----------
    noise : float >= 0 or None. The magnitude whose ``"noise=<eps>"`` columns are used; None picks the one
        with the best ``cv``-fold cross-validated AUROC of a logistic regression on the fitting data
        (ties go to the smaller magnitude). The choice is kept in ``noise_``.
    cv : int >= 2, folds of that selection (fewer if a class has fewer rows).
    classifier, target_fpr, C, n_estimators, max_depth, random_state : see :class:`FeatureDetector`.
    ``fit`` must be given ``groups``, the group of each column of X.
    """

    def __init__(
        self,
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
            classifier=classifier,
            target_fpr=target_fpr,
            C=C,
            n_estimators=n_estimators,
            max_depth=max_depth,
            random_state=random_state,
        )
        self.noise = noise
        self.cv = cv

    def _check_params(self) -> None:
        super()._check_params()
        if self.noise is not None and not self.noise >= 0:
            raise ValueError(f"noise={self.noise} must be >= 0 or None")
        if self.cv < 2:
            raise ValueError(f"cv={self.cv} must be >= 2")

    def _noise_columns(self, groups: Sequence[str]) -> dict[float, np.ndarray]:
        g = np.asarray(groups)
        grid = sorted({e for e in map(_noise_of, groups) if e is not None})
        if not grid:
            raise ValueError("no column of X belongs to a 'noise=<eps>' group")
        return {e: np.flatnonzero(g == noise_group(e)) for e in grid}

    def _select_noise(self, X: np.ndarray, y: np.ndarray, by_noise: dict[float, np.ndarray]) -> float:
        folds = min(self.cv, int(np.bincount(y.astype(np.int64)).min()))
        if len(by_noise) == 1 or folds < 2:
            return next(iter(by_noise))
        split = StratifiedKFold(folds, shuffle=True, random_state=self.random_state)
        auroc = {
            e: cross_val_score(
                make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=5000)),
                X[:, cols],
                y,
                cv=split,
                scoring="roc_auc",
            ).mean()
            for e, cols in by_noise.items()
        }
        log.info("Mahalanobis cross-validated AUROC by noise: %s", auroc)
        return max(auroc, key=lambda e: (auroc[e], -e))

    def fit(self, X, y, *, groups: Sequence[str] | None = None, X_calibration=None) -> MahalanobisDetector:
        """As :meth:`FeatureDetector.fit`; first chooses ``noise_`` (see the class docstring)."""
        self._check_params()
        X, y = check_X_y(X, y, dtype=np.float64)
        if groups is None or len(groups) != X.shape[1]:
            raise ValueError(
                f"{type(self).__name__}.fit needs groups=, the feature group of each of the {X.shape[1]} columns"
            )
        by_noise = self._noise_columns(groups)
        if self.noise is not None:
            if float(self.noise) not in by_noise:
                raise ValueError(f"noise={self.noise} has no columns; X has noise={sorted(by_noise)}")
            self.noise_ = float(self.noise)
        elif np.array_equal(np.unique(y), [0, 1]):
            self.noise_ = self._select_noise(X, y, by_noise)
        else:
            self.noise_ = min(by_noise)  # the base class rejects these labels next
        return super().fit(X, y, groups=groups, X_calibration=X_calibration)

    def _columns(self, n_features: int, groups: Sequence[str] | None) -> np.ndarray:
        return self._noise_columns(groups)[self.noise_]

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, info = super().to_state()
        info["noise_selected"] = self.noise_
        return tensors, info

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict) -> MahalanobisDetector:
        det = super().from_state(tensors, info)
        det.noise_ = float(info["noise_selected"])
        return det


register_featurizer("mahalanobis", lambda ctx: MahalanobisFeaturizer(ctx.model, batch_size=ctx.batch_size))
register_detector(
    DetectorEntry(
        "mahalanobis",
        "mahalanobis",
        lambda fpr, seed: MahalanobisDetector(classifier="logreg", target_fpr=fpr, random_state=seed),
        "Mahalanobis (Lee et al. 2018): logistic regression on per-stage tied-covariance Gaussian scores after "
        "input pre-processing, noise magnitude chosen by cross-validation on the fitting data",
    )
)
