"""An in-memory image dataset: uint8 images (N, C, H, W), integer labels and class names."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


@dataclass
class ImageDataset:
    """Images kept as uint8 to save memory; :meth:`float_images` gives them in [0, 1].

    Attributes
    ----------
    images : Tensor (N, C, H, W), uint8.
    labels : Tensor (N,), int64 in [0, len(classes)).
    classes : class names, index = label.
    name : where the data came from, e.g. ``"fashion-mnist:train"``.
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    name: str = ""
    indices: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {tuple(self.labels.shape)} does not match {self.images.shape[0]} images")
        self.labels = self.labels.long()
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(
                f"labels must lie in [0, {len(self.classes)}), got [{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def float_images(self, index: Tensor | slice | None = None) -> Tensor:
        imgs = self.images if index is None else self.images[index]
        return imgs.float().div_(255.0)

    def subset(self, index: Tensor, suffix: str = "") -> ImageDataset:
        """The images at ``index``; ``indices`` records their positions in the parent set."""
        index = torch.as_tensor(index, dtype=torch.long)
        parent = self.indices[index] if self.indices is not None else index
        return ImageDataset(self.images[index], self.labels[index], self.classes, self.name + suffix, parent)

    def fingerprint(self) -> str:
        """SHA-256 over shape, pixels and labels: which data a model was trained on."""
        h = hashlib.sha256()
        h.update(str(tuple(self.images.shape)).encode())
        h.update(np.ascontiguousarray(self.images.numpy()).tobytes())
        h.update(np.ascontiguousarray(self.labels.numpy()).tobytes())
        return h.hexdigest()


def train_val_split(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic split of ``range(n)`` into (train, validation) indices, by seed."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size={val_size} must be in [0, {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images given as floats in [0, 1] or as uint8, to uint8; refuses anything else."""
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        if images.size and (not np.isfinite(images).all() or images.min() < 0 or images.max() > 1):
            raise ValueError("float images must be finite and lie in [0, 1]")
        return np.round(images * 255).astype(np.uint8)
    raise ValueError(f"images of dtype {images.dtype} are not supported; give uint8 or float in [0, 1]")
