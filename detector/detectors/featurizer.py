"""The model-bound half of a detector: turns images into the feature matrix its estimator reads.

A featurizer is fitted once on clean training images (class statistics, reference sets) and then
maps any batch of images (N, C, H, W) in [0, 1] to a feature matrix (N, F). Its ``groups`` name the
feature group of each column, which estimators may use to select columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..features import extract_path_features
from ..models import DecoupledNet
from ..prototypes import Prototypes, compute_prototypes


@dataclass
class FeaturizerContext:
    """What a featurizer may use: the model, its class prototypes, clean training images, a seed."""

    model: DecoupledNet
    prototypes: Prototypes | None
    train_images: Tensor
    train_labels: Tensor
    seed: int = 0
    batch_size: int = 500


class Featurizer(Protocol):
    groups: list[str]

    def fit(self, images: Tensor, labels: Tensor) -> Featurizer: ...

    def transform(self, images: Tensor) -> np.ndarray: ...


class PathFeaturizer:
    """Path features of :mod:`detector.features` (needs a gated model and class prototypes)."""

    def __init__(self, model: DecoupledNet, prototypes: Prototypes | None = None, batch_size: int = 500) -> None:
        self.model = model
        self.prototypes = prototypes
        self.batch_size = batch_size
        self.groups: list[str] = []

    def fit(self, images: Tensor, labels: Tensor) -> PathFeaturizer:
        if self.prototypes is None:
            from ..data import ImageDataset

            data = ImageDataset(
                (images * 255).round().to(torch.uint8), labels, [str(i) for i in range(self.model.num_classes)]
            )
            self.prototypes = compute_prototypes(self.model, data)
        return self

    def transform(self, images: Tensor) -> np.ndarray:
        if self.prototypes is None:
            raise RuntimeError("PathFeaturizer.transform called before fit")
        feats = extract_path_features(self.model, self.prototypes, images, batch_size=self.batch_size)
        self.groups = feats.groups
        return feats.X
