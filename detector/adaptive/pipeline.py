"""What an adaptive attacker attacks: classifier, path features and the fitted detector, as one function."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..detectors import FeatureDetector
from ..features import path_features
from ..models import DecoupledNet, PathOutput
from ..prototypes import Prototypes
from .surrogate import DetectorSurrogate


@dataclass
class Pipeline:
    """A gated model, its class prototypes, a fitted path detector and a differentiable surrogate of it.

    ``detector`` decides what is flagged (``score > detector.threshold_``); ``surrogate`` is only what the
    attacker differentiates.
    """

    model: DecoupledNet
    prototypes: Prototypes
    detector: FeatureDetector
    surrogate: DetectorSurrogate | None  # None: only for attacks that do not differentiate the detector

    @property
    def threshold(self) -> float:
        return float(self.detector.threshold_)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, x: Tensor) -> tuple[PathOutput, Tensor]:
        """Path output and feature rows (N, F) of images x (N, C, H, W) in [0, 1], with gradients."""
        out = self.model.forward_path(x)
        return out, path_features(out, self.prototypes, x)[0]

    def real_scores(self, X: Tensor) -> np.ndarray:
        """The detector's own scores (N,) of feature rows X, computed exactly as screening does."""
        return self.detector.decision_function(X.detach().cpu().double().numpy())

    @torch.no_grad()
    def evaluate(self, images: Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(predictions (N,), scores (N,), feature rows (N, F)) of images (N, C, H, W) in [0, 1]."""
        self.model.eval()
        preds, scores, feats = [], [], []
        for start in range(0, len(images), batch_size):
            out, X = self.forward(images[start : start + batch_size].to(self.device))
            preds.append(out.logits.argmax(1).cpu().numpy())
            scores.append(self.real_scores(X))
            feats.append(X.cpu().double().numpy())
        if not preds:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 0))
        return np.concatenate(preds), np.concatenate(scores), np.concatenate(feats)
