"""Fitted scikit-learn classifiers exported to plain arrays, and scored from them with numpy.

A fitted detector keeps only its scorer: the same code scores right after ``fit`` and after loading
from a bundle, and persisting needs no pickle (arrays go to safetensors, the rest to JSON).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))


@dataclass
class LinearScorer:
    """``sigmoid(((x - mean) / scale) @ coef + intercept)``: a standardised logistic regression."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return _sigmoid(((X - self.mean) / self.scale) @ self.coef + self.intercept)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        arrays = {"mean": self.mean, "scale": self.scale, "coef": self.coef}
        return {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in arrays.items()}, {
            "kind": "linear",
            "intercept": float(self.intercept),
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict) -> LinearScorer:
        return cls(tensors["mean"].numpy(), tensors["scale"].numpy(), tensors["coef"].numpy(), float(info["intercept"]))


@dataclass
class TreeScorer:
    """An ensemble of binary decision trees stored as flat node arrays.

    ``combine="mean"``: average of the leaves' adversarial fraction (random forest).
    ``combine="sigmoid_sum"``: ``sigmoid(baseline + sum of leaf values)`` (gradient boosting).
    A sample goes left where ``x[feature] <= threshold``.
    """

    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    value: np.ndarray
    is_leaf: np.ndarray
    roots: np.ndarray
    combine: str
    baseline: float
    max_depth: int

    def __call__(self, X: np.ndarray) -> np.ndarray:
        rows = np.arange(len(X))[:, None]
        node = np.broadcast_to(self.roots, (len(X), len(self.roots))).copy()
        for _ in range(self.max_depth):
            go_left = X[rows, self.feature[node]] <= self.threshold[node]
            step = np.where(go_left, self.left[node], self.right[node])
            node = np.where(self.is_leaf[node], node, step)
        leaves = self.value[node]
        if self.combine == "mean":
            return leaves.mean(axis=1)
        return _sigmoid(self.baseline + leaves.sum(axis=1))

    _ARRAYS = ("left", "right", "feature", "threshold", "value", "is_leaf", "roots")

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k))) for k in self._ARRAYS}
        tensors["is_leaf"] = tensors["is_leaf"].to(torch.uint8)
        return tensors, {
            "kind": "trees",
            "combine": self.combine,
            "baseline": self.baseline,
            "max_depth": self.max_depth,
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict) -> TreeScorer:
        arrays = {k: tensors[k].numpy() for k in cls._ARRAYS}
        arrays["is_leaf"] = arrays["is_leaf"].astype(bool)
        return cls(
            **arrays, combine=info["combine"], baseline=float(info["baseline"]), max_depth=int(info["max_depth"])
        )


def _concat_trees(trees: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    offsets = np.cumsum([0] + [len(t["value"]) for t in trees])[:-1]
    out = {k: np.concatenate([t[k] for t in trees]) for k in ("feature", "threshold", "value", "is_leaf")}
    out["left"] = np.concatenate([np.where(t["is_leaf"], 0, t["left"]) + o for t, o in zip(trees, offsets)])
    out["right"] = np.concatenate([np.where(t["is_leaf"], 0, t["right"]) + o for t, o in zip(trees, offsets)])
    out["roots"] = offsets.astype(np.int64)
    out["feature"] = np.where(out["is_leaf"], 0, out["feature"]).astype(np.int64)
    out["left"], out["right"] = out["left"].astype(np.int64), out["right"].astype(np.int64)
    out["threshold"] = out["threshold"].astype(np.float64)
    out["value"] = out["value"].astype(np.float64)
    return out


def export_scorer(model) -> LinearScorer | TreeScorer | IdentityScorer:
    """Turn a fitted classifier (optionally a Pipeline with a StandardScaler) into a scorer."""
    scaler = None
    if isinstance(model, Pipeline):
        scaler, model = model.steps[0][1], model.steps[-1][1]
    if isinstance(model, LogisticRegression):
        n = model.coef_.shape[1]
        mean = scaler.mean_ if isinstance(scaler, StandardScaler) else np.zeros(n)
        scale = scaler.scale_ if isinstance(scaler, StandardScaler) else np.ones(n)
        return LinearScorer(np.asarray(mean), np.asarray(scale), model.coef_[0].copy(), float(model.intercept_[0]))
    if scaler is not None:
        raise ValueError("tree ensembles are exported without a scaler")
    if isinstance(model, RandomForestClassifier):
        trees = []
        for est in model.estimators_:
            t = est.tree_
            v = t.value[:, 0, :]
            frac = v[:, 1] / np.maximum(v.sum(axis=1), 1e-12)
            trees.append(
                {
                    "left": t.children_left,
                    "right": t.children_right,
                    "feature": t.feature,
                    "threshold": t.threshold,
                    "value": frac,
                    "is_leaf": t.children_left == -1,
                }
            )
        depth = max(est.tree_.max_depth for est in model.estimators_)
        return TreeScorer(**_concat_trees(trees), combine="mean", baseline=0.0, max_depth=int(depth))
    if isinstance(model, HistGradientBoostingClassifier):
        trees = []
        for (pred,) in model._predictors:  # one tree per iteration in binary classification
            nodes = pred.nodes
            trees.append(
                {
                    "left": nodes["left"],
                    "right": nodes["right"],
                    "feature": nodes["feature_idx"],
                    "threshold": nodes["num_threshold"],
                    "value": nodes["value"],
                    "is_leaf": nodes["is_leaf"].astype(bool),
                }
            )
        depth = max(int(p[0].nodes["depth"].max()) for p in model._predictors) if trees else 0
        baseline = float(np.ravel(model._baseline_prediction)[0])
        return TreeScorer(**_concat_trees(trees), combine="sigmoid_sum", baseline=baseline, max_depth=depth)
    raise ValueError(f"cannot export a {type(model).__name__}")


def scorer_from_state(tensors: dict[str, torch.Tensor], info: dict) -> LinearScorer | TreeScorer | IdentityScorer:
    kind = info.get("kind")
    if kind == "linear":
        return LinearScorer.from_state(tensors, info)
    if kind == "trees":
        return TreeScorer.from_state(tensors, info)
    if kind == "identity":
        return IdentityScorer()
    if kind == "max":
        return MaxScorer()
    raise ValueError(f"unknown scorer kind {kind!r}")


@dataclass
class IdentityScorer:
    """The single selected feature is the score (it must already lie in [0, 1])."""

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return np.clip(X[:, 0], 0.0, 1.0)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {"kind": "identity"}


@dataclass
class MaxScorer:
    """The maximum of the selected features is the score (each must already lie in [0, 1])."""

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return np.clip(X.max(axis=1), 0.0, 1.0)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {"kind": "max"}
