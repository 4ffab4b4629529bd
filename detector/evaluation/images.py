"""The image sets of an evaluation: calibration, fitting and evaluation (pairwise disjoint)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import ImageDataset
from ..models import DecoupledNet
from ..splits import Splits, correctly_classified


@dataclass
class ImageSet:
    name: str  # which dataset split the images come from
    indices: Tensor  # positions in that split
    images: Tensor  # (N, C, H, W) float in [0, 1]
    labels: Tensor

    def describe(self) -> dict:
        return {"set": self.name, "n": len(self.indices), "indices": self.indices.tolist()}


def _take(data: ImageDataset, idx: Tensor) -> ImageSet:
    return ImageSet(data.name, idx, data.float_images(idx), data.labels[idx])


@dataclass
class ImageSets:
    calibration: ImageSet
    fit: ImageSet
    eval: ImageSet
    reference: ImageSet

    @property
    def attack_images(self) -> tuple[Tensor, Tensor]:
        """The images that get attacked: fitting set first, then evaluation set."""
        return torch.cat([self.fit.images, self.eval.images]), torch.cat([self.fit.labels, self.eval.labels])


def select_images(
    model: DecoupledNet, splits: Splits, *, n: int, n_fit: int, n_calibration: int, n_reference: int, seed: int
) -> ImageSets:
    """Correctly classified images: calibration then fit from the validation split, eval from the test set."""
    cal = correctly_classified(model, splits.val, n_calibration, seed=seed)
    fit = correctly_classified(model, splits.val, n_fit, seed=seed, skip=n_calibration)
    ev = correctly_classified(model, splits.test, n, seed=seed)
    ref = torch.arange(min(n_reference, len(splits.train)))
    return ImageSets(_take(splits.val, cal), _take(splits.val, fit), _take(splits.test, ev), _take(splits.train, ref))
