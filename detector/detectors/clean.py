"""Clean-only detectors: fitted on the paths of clean images alone, no adversarial example anywhere.

Each models how clean images of a class compute (scikit-learn's outlier-detector contract, ``fit(X_clean)``)
and scores how far an input's path departs from that model. A raw anomaly score becomes a p-value under
the scores of *other* clean images (the calibration rows, :class:`NullDistribution`), and the adversarial
score is ``t / (1 + t)`` with ``t = -log p``: in [0, 1), monotone in the raw score, and comparable across
detectors, which is what lets :mod:`detector.detectors.ensemble` combine them.

Rows are the path features of :mod:`detector.features`; the predicted class is the argmax of the
``logits`` columns, so an input is always judged against the class the network says it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.utils.validation import check_array, check_is_fitted

from ..features import LOGITS
from .base import FeatureDetector, threshold_at_fpr

TAIL_QUANTILE = 0.9  # above this quantile of the null, p-values follow a fitted exponential tail


def _half(X: np.ndarray) -> np.ndarray:
    """Reference rows rounded to float16 precision (kept as float32): what a bundle stores, so that a detector
    scores the same before and after a save/load (kNN reference sets are the bulk of a bundle's detector)."""
    return X.astype(np.float16).astype(np.float32)


class NullDistribution:
    """p-values of raw anomaly scores under clean scores: empirical below the 90% quantile ``u``, an
    exponential tail ``p(u) exp(-(s - u) / beta)`` above it (``beta`` the mean excess over ``u``), so that
    scores beyond every clean one still keep their order instead of tying at ``1 / (n + 1)``."""

    def __init__(self, null: np.ndarray) -> None:
        s = np.sort(np.asarray(null, dtype=np.float64))
        if len(s) < 10:
            raise ValueError(f"a null distribution needs at least 10 clean scores, got {len(s)}")
        self.sorted = s
        self.u = float(np.quantile(s, TAIL_QUANTILE))
        excess = s[s > self.u] - self.u
        self.beta = float(excess.mean()) if len(excess) and excess.mean() > 0 else float(s.std() + 1e-12)
        self.p_u = (1 + np.sum(s >= self.u)) / (len(s) + 1)

    def neg_log_p(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.float64)
        n = len(self.sorted)
        ge = n - np.searchsorted(self.sorted, raw, side="left")
        log_p = np.log((1 + ge) / (n + 1))
        tail = raw > self.u
        log_p[tail] = np.log(self.p_u) - (raw[tail] - self.u) / self.beta
        return -log_p

    def to_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.sorted.copy())


def _columns(groups: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
    cols = np.flatnonzero(np.isin(np.asarray(groups), list(wanted)))
    if len(cols) == 0:
        raise ValueError(f"no column of X belongs to groups {list(wanted)}")
    return cols


class CleanDetector(FeatureDetector):
    """Base of the clean-only detectors. Subclasses implement ``_fit_model(X, pred)`` and ``_raw(X, pred)``
    (X the selected columns, pred the predicted classes) and list their learned arrays in ``_STATE``.

    ``fit(X_clean, groups=..., layer_sizes=..., X_calibration=None)``: X_clean (n, F) are path-feature rows
    of clean images; X_calibration other clean rows for the null and the threshold (default: a held-out
    quarter of X_clean). ``y``, if given, must be all 0: these detectors never see an adversarial label.
    """

    clean_only = True
    _STATE: tuple[str, ...] = ()

    def __init__(self, target_fpr: float = 0.05, random_state: int = 0) -> None:
        self.target_fpr = target_fpr
        self.random_state = random_state

    def _check_params(self) -> None:
        if not 0 < self.target_fpr < 1:
            raise ValueError(f"target_fpr={self.target_fpr} must be in (0, 1)")

    def _groups(self) -> tuple[str, ...]:
        raise NotImplementedError

    def fit(self, X, y=None, *, groups: Sequence[str], layer_sizes: Sequence[int], X_calibration=None) -> CleanDetector:
        self._check_params()
        X = check_array(X, dtype=np.float64)
        if y is not None and np.any(np.asarray(y) != 0):
            raise ValueError("clean-only detectors are fitted on clean rows only; y must be all 0 (or None)")
        if len(groups) != X.shape[1]:
            raise ValueError(f"groups has {len(groups)} names for {X.shape[1]} columns")
        if X_calibration is None:
            order = np.random.default_rng(self.random_state).permutation(len(X))
            cut = len(X) * 3 // 4
            X, X_calibration = X[order[:cut]], X[order[cut:]]
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.array([0, 1])
        self.layer_sizes_ = np.asarray(layer_sizes, dtype=np.int64)
        self.columns_ = _columns(groups, self._groups())
        self.logit_columns_ = _columns(groups, [LOGITS])
        self._fit_model(X[:, self.columns_], self._pred(X))
        self.calibrate(X_calibration)
        return self

    def _pred(self, X: np.ndarray) -> np.ndarray:
        return X[:, self.logit_columns_].argmax(1)

    def raw_score(self, X) -> np.ndarray:
        """The raw anomaly score (higher = further from clean paths) of rows X (n, n_features_in_)."""
        check_is_fitted(self, "columns_")
        X = check_array(X, dtype=np.float64)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but this detector was fitted on {self.n_features_in_}")
        return self._raw(X[:, self.columns_], self._pred(X))

    def calibrate(self, X_clean) -> CleanDetector:
        """Null distribution of the raw score and threshold at ``target_fpr``, on clean rows."""
        self.null_ = NullDistribution(self.raw_score(X_clean))
        self.threshold_ = threshold_at_fpr(self.decision_function(X_clean), self.target_fpr)
        return self

    def neg_log_p(self, X) -> np.ndarray:
        """-log p-value of each row under the clean null (>= 0)."""
        check_is_fitted(self, "null_")
        return self.null_.neg_log_p(self.raw_score(X))

    def decision_function(self, X) -> np.ndarray:
        t = self.neg_log_p(X)
        return t / (1.0 + t)

    # -- persistence ------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        check_is_fitted(self, ["null_", "threshold_"])
        tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k + "_"))) for k in self._STATE}
        if "reference" in tensors:  # stored as float16: the values already are (see _half), half the bytes
            tensors["reference"] = tensors["reference"].to(torch.float16)
        tensors.update(
            {
                "columns": torch.from_numpy(self.columns_.astype(np.int64)),
                "logit_columns": torch.from_numpy(self.logit_columns_.astype(np.int64)),
                "layer_sizes": torch.from_numpy(self.layer_sizes_),
                "null": self.null_.to_tensor(),
            }
        )
        info = {
            "estimator": type(self).__name__,
            "params": self.get_params(),
            "threshold": self.threshold_,
            "n_features_in": int(self.n_features_in_),
        }
        return tensors, info

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict) -> CleanDetector:
        if info.get("estimator") != cls.__name__:
            raise ValueError(f"state is of a {info.get('estimator')!r}, not a {cls.__name__}")
        det = cls(**info["params"])
        det._check_params()
        missing = {*det._STATE, "columns", "logit_columns", "layer_sizes", "null"} - set(tensors)
        if missing:
            raise ValueError(f"{cls.__name__} state lacks tensors {sorted(missing)}")
        for k in det._STATE:
            setattr(det, k + "_", tensors[k].float().numpy() if k == "reference" else tensors[k].numpy())
        det.columns_, det.logit_columns_ = tensors["columns"].numpy(), tensors["logit_columns"].numpy()
        det.layer_sizes_ = tensors["layer_sizes"].numpy()
        det.null_ = NullDistribution(tensors["null"].numpy())
        det.n_features_in_ = int(info["n_features_in"])
        det.threshold_ = float(info["threshold"])
        det.classes_ = np.array([0, 1])
        return det


def per_class_subset(pred: np.ndarray, size: int, n_classes: int, seed: int) -> np.ndarray:
    """Indices of at most ``size`` rows of each predicted class (a seeded random subset): a kNN reference set."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.flatnonzero(pred == c))[:size] for c in range(n_classes)])


def squared_distances(X: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(len(X), len(reference)) squared Euclidean distances, by the expansion |x|^2 - 2 x.r + |r|^2 (one matrix
    product; may dip slightly below 0 by rounding, so callers clip before a square root)."""
    return (X**2).sum(1)[:, None] - 2 * X @ reference.T + (reference**2).sum(1)[None, :]


def knn_distance(
    X: np.ndarray,
    pred: np.ndarray,
    reference: np.ndarray,
    reference_class: np.ndarray,
    k: int,
    radius: np.ndarray | None = None,
    local: float = 0.0,
) -> np.ndarray:
    """Mean Euclidean distance of each row of X to its ``k`` nearest ``reference`` rows of its predicted class
    (inf where that class has no reference row); with ``radius`` (one per reference row) and ``local`` > 0,
    divided by the neighbours' mean radius to the power ``local`` (1: a local-outlier-factor ratio)."""
    out = np.empty(len(X))
    Xf = X.astype(np.float32)
    for c in np.unique(pred):
        rows, members = pred == c, np.flatnonzero(reference_class == c)
        if len(members) == 0:
            out[rows] = np.inf
            continue
        ref = reference[members]
        d2 = squared_distances(Xf[rows], ref)
        kk = min(k, len(ref))
        nn = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
        dist = np.sqrt(np.clip(np.take_along_axis(d2, nn, axis=1), 0, None)).mean(1)
        if radius is not None and local > 0:
            dist = dist / radius[members][nn].mean(1) ** local
        out[rows] = dist
    return out


def reference_radius(reference: np.ndarray, reference_class: np.ndarray, k: int) -> np.ndarray:
    """Per reference row, the mean distance to its ``k`` nearest *other* reference rows of its class (how sparse
    the clean paths are around it; 1 for a class with a single row)."""
    radius = np.ones(len(reference), dtype=np.float32)
    for c in np.unique(reference_class):
        members = np.flatnonzero(reference_class == c)
        if len(members) < 2:
            continue
        ref = reference[members].astype(np.float32)
        for s in range(0, len(ref), 1000):
            d2 = squared_distances(ref[s : s + 1000], ref)
            d2[np.arange(len(d2)), np.arange(s, s + len(d2))] = np.inf
            kk = min(k, len(ref) - 1)
            near = np.sqrt(np.clip(np.partition(d2, kk - 1, axis=1)[:, :kk], 0, None)).mean(1)
            radius[members[s : s + 1000]] = np.maximum(near, 1e-6)
    return radius


DENSITIES = ("bernoulli", "gaussian", "knn")


class PathLikelihoodDetector(CleanDetector):
    """How unlikely an input's path is among the clean paths of its predicted class.

    Parameters
    ----------
    density : {"bernoulli", "gaussian", "knn"}
        ``"bernoulli"``: per-class independent Bernoulli per filter on the hard path (Laplace-smoothed
        frequencies); raw score the negative log-likelihood. ``"gaussian"``: per-class means with one tied,
        Ledoit-Wolf-shrunk covariance; raw score the squared Mahalanobis distance to the predicted class's
        mean. ``"knn"``: mean Euclidean distance to the ``k`` nearest clean paths of the predicted class.
    feature_groups : columns modelled; default the hard path for "bernoulli", the soft path otherwise.
        ``("density", "proto", "confidence")`` with "gaussian" models the path's summary statistics.
    k : int >= 1, neighbours for "knn".
    standardize : scale every column to zero mean and unit variance over the clean fitting rows first (so
        that a layer's many filters do not outweigh a thin layer's few in a distance).
    logit : model ``log(p / (1 - p))`` of the soft path (clipped to p in [1e-4, 1 - 1e-4]) instead of p: undoes
        the sigmoid's saturation, so gates far on or far off still differ.
    max_reference : int >= 1, most clean rows a "knn" detector keeps (per class, a random subset).
    target_fpr, random_state : see :class:`CleanDetector`.
    """

    def __init__(
        self,
        density: str = "gaussian",
        feature_groups: Sequence[str] | None = None,
        k: int = 10,
        max_reference: int = 500,
        logit: bool = False,
        standardize: bool = False,
        target_fpr: float = 0.05,
        random_state: int = 0,
    ) -> None:
        super().__init__(target_fpr=target_fpr, random_state=random_state)
        self.density = density
        self.feature_groups = feature_groups
        self.k = k
        self.max_reference = max_reference
        self.logit = logit
        self.standardize = standardize

    @property
    def _STATE(self) -> tuple[str, ...]:  # type: ignore[override]
        state = {
            "bernoulli": ("log_freq", "log_1m_freq"),
            "gaussian": ("means", "precision"),
            "knn": ("reference", "reference_class"),
        }[self.density]
        return state + (("center", "spread") if self.standardize else ())

    def _check_params(self) -> None:
        super()._check_params()
        if self.density not in DENSITIES:
            raise ValueError(f"density={self.density!r} must be one of {DENSITIES}")
        if self.logit and (self.density == "bernoulli" or self.feature_groups is not None):
            raise ValueError("logit=True applies to the soft path only (density 'gaussian' or 'knn', default groups)")
        if self.k < 1 or self.max_reference < 1:
            raise ValueError(f"k={self.k} and max_reference={self.max_reference} must be >= 1")

    def _groups(self) -> tuple[str, ...]:
        if self.feature_groups is not None:
            return tuple(self.feature_groups)
        return ("hard",) if self.density == "bernoulli" else ("soft",)

    def _transform(self, X: np.ndarray, fit: bool = False) -> np.ndarray:
        if self.logit:
            p = np.clip(X, 1e-4, 1 - 1e-4)
            X = np.log(p) - np.log1p(-p)
        if self.standardize:
            if fit:
                self.center_, self.spread_ = X.mean(0), np.where(X.std(0) > 1e-6, X.std(0), 1.0)
            X = (X - self.center_) / self.spread_
        return X

    def _fit_model(self, X: np.ndarray, pred: np.ndarray) -> None:
        K = len(self.logit_columns_)
        X = self._transform(X, fit=True)
        if self.density == "bernoulli":
            onehot = np.eye(K)[pred]
            counts = onehot.sum(0)
            freq = (onehot.T @ (X > 0.5) + 1) / (counts[:, None] + 2)
            self.log_freq_, self.log_1m_freq_ = np.log(freq), np.log1p(-freq)
        elif self.density == "gaussian":
            from sklearn.covariance import LedoitWolf

            means = np.stack([X[pred == c].mean(0) if np.any(pred == c) else X.mean(0) for c in range(K)])
            cov = LedoitWolf().fit(X - means[pred]).covariance_
            self.means_, self.precision_ = means, np.linalg.pinv(cov)
        else:
            keep = per_class_subset(pred, self.max_reference, K, self.random_state)
            self.reference_, self.reference_class_ = _half(X[keep]), pred[keep].astype(np.int64)

    def _raw(self, X: np.ndarray, pred: np.ndarray) -> np.ndarray:
        X = self._transform(X)
        if self.density == "bernoulli":
            g = (X > 0.5).astype(np.float64)
            return -(g * self.log_freq_[pred] + (1 - g) * self.log_1m_freq_[pred]).sum(1)
        if self.density == "gaussian":
            d = X - self.means_[pred]
            return np.einsum("ij,jk,ik->i", d, self.precision_, d)
        return knn_distance(X, pred, self.reference_, self.reference_class_, self.k)


LAYER_METHODS = ("logreg", "knn")


class LayerConsistencyDetector(CleanDetector):
    """Does every layer's path point to the class the network finally predicts?

    Per gated layer l, a class posterior of the layer's soft path p_l learnt from clean images labelled with
    their predicted class; the raw score sums over layers how much the layer disagrees with the final
    prediction. An attacked image that follows its true class early and the target class late (METHOD.md
    3.3) disagrees in the early layers.

    Parameters
    ----------
    method : {"logreg", "knn"}
        ``"logreg"``: a multinomial logistic regression per layer gives q_l(k | p_l); the score is
        ``sum_l [max_k log q_l(k) - log q_l(pred)]`` (0 when every layer agrees). ``"knn"``: the ``k`` nearest
        clean paths of the layer (all classes) vote, and the score counts the votes against the prediction
        summed over layers: the nonconformity of Papernot & McDaniel's deep k-nearest neighbours, on paths.
    C : float > 0, inverse regularisation of the logistic regressions (on standardised columns).
    k : int >= 1, neighbours per layer for "knn".
    max_reference : int >= 1, most clean rows "knn" keeps (a random subset).
    target_fpr, random_state : see :class:`CleanDetector`.
    """

    def __init__(
        self,
        method: str = "knn",
        C: float = 0.1,
        k: int = 50,
        max_reference: int = 5000,
        target_fpr: float = 0.05,
        random_state: int = 0,
    ) -> None:
        super().__init__(target_fpr=target_fpr, random_state=random_state)
        self.method = method
        self.C = C
        self.k = k
        self.max_reference = max_reference

    @property
    def _STATE(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("coef", "intercept", "mean", "scale") if self.method == "logreg" else ("reference", "reference_class")

    def _check_params(self) -> None:
        super()._check_params()
        if self.method not in LAYER_METHODS:
            raise ValueError(f"method={self.method!r} must be one of {LAYER_METHODS}")
        if self.C <= 0:
            raise ValueError(f"C={self.C} must be > 0")
        if self.k < 1 or self.max_reference < 1:
            raise ValueError(f"k={self.k} and max_reference={self.max_reference} must be >= 1")

    def _groups(self) -> tuple[str, ...]:
        return ("soft",)

    def _bounds(self) -> list[tuple[int, int]]:
        b = np.r_[0, np.cumsum(self.layer_sizes_)]
        return list(zip(b[:-1].tolist(), b[1:].tolist()))

    def _fit_model(self, X: np.ndarray, pred: np.ndarray) -> None:
        K, G = len(self.logit_columns_), X.shape[1]
        if int(self.layer_sizes_.sum()) != G:
            raise ValueError(f"layer_sizes sum to {int(self.layer_sizes_.sum())}, but the soft path has {G} columns")
        if self.method == "knn":
            keep = np.random.default_rng(self.random_state).permutation(len(X))[: self.max_reference]
            self.reference_, self.reference_class_ = _half(X[keep]), pred[keep].astype(np.int64)
            return
        from sklearn.linear_model import LogisticRegression

        self.mean_, self.scale_ = X.mean(0), np.where(X.std(0) > 1e-6, X.std(0), 1.0)
        Z = (X - self.mean_) / self.scale_
        coef, intercept = np.zeros((K, G)), np.zeros((len(self.layer_sizes_), K))
        present = np.unique(pred)
        for i, (a, b) in enumerate(self._bounds()):
            lr = LogisticRegression(C=self.C, max_iter=2000).fit(Z[:, a:b], pred)
            coef[present, a:b] = lr.coef_ if len(present) > 2 else np.vstack([-lr.coef_, lr.coef_])
            intercept[i, present] = lr.intercept_ if len(present) > 2 else [-lr.intercept_[0], lr.intercept_[0]]
            intercept[i, np.setdiff1d(np.arange(K), present)] = -1e3  # a class never predicted: never favoured
        self.coef_, self.intercept_ = coef, intercept

    def layer_log_posteriors(self, X: np.ndarray) -> np.ndarray:
        """(n, L, K) log q_l(k | p_l) for soft-path columns X (n, G) ("logreg" only)."""
        Z = (X - self.mean_) / self.scale_
        logits = np.stack(
            [Z[:, a:b] @ self.coef_[:, a:b].T + self.intercept_[i] for i, (a, b) in enumerate(self._bounds())], 1
        )
        return logits - np.logaddexp.reduce(logits, axis=2, keepdims=True)

    def layer_disagreement(self, X: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """(n, L): each layer's disagreement with the prediction (the terms the raw score sums)."""
        if self.method == "logreg":
            lp = self.layer_log_posteriors(X)
            return lp.max(2) - lp[np.arange(len(X)), :, pred]
        Xf, ref = X.astype(np.float32), self.reference_
        k = min(self.k, len(ref))
        out = np.zeros((len(X), len(self.layer_sizes_)))
        for i, (a, b) in enumerate(self._bounds()):
            for s in range(0, len(X), 512):
                q, r = Xf[s : s + 512, a:b], ref[:, a:b]
                d2 = (q**2).sum(1)[:, None] - 2 * q @ r.T + (r**2).sum(1)[None, :]
                nn = np.argpartition(d2, k - 1, axis=1)[:, :k]
                out[s : s + 512, i] = (self.reference_class_[nn] != pred[s : s + 512, None]).sum(1)
        return out

    def _raw(self, X: np.ndarray, pred: np.ndarray) -> np.ndarray:
        return self.layer_disagreement(X, pred).sum(1)


class LowMarginDetector(CleanDetector):
    """How unusually undecided the classifier is: raw score ``-(p_top1 - p_top2)`` of the softmax.

    One-sided and fixed: a low margin is rare on clean images (Hendrycks & Gimpel's baseline), and
    minimal-perturbation attacks (CW, DeepFool) stop just past the decision boundary. Over-confident outputs
    (PGD) score low here and are left to the path scores; nothing is learnt that could flip the direction.
    Parameters: ``target_fpr``, ``random_state`` (see :class:`CleanDetector`).
    """

    _STATE = ()

    def _groups(self) -> tuple[str, ...]:
        return ("logits",)

    def _fit_model(self, X: np.ndarray, pred: np.ndarray) -> None:
        return None

    def _raw(self, X: np.ndarray, pred: np.ndarray) -> np.ndarray:
        z = X - X.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        top2 = np.sort(p, axis=1)[:, -2:]
        return -(top2[:, 1] - top2[:, 0])
