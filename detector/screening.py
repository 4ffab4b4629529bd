"""Predict-and-screen: one forward pass gives the prediction, the path and the adversarial score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .detectors import FeatureDetector
from .features import path_features
from .models import DecoupledNet
from .prototypes import Prototypes


class InvalidImages(ValueError):
    """Images that cannot be screened; the message says what is wrong with them."""


def check_images(images: Tensor, shape: tuple[int, int, int], max_images: int | None = None) -> Tensor:
    """Validate a float batch (N, C, H, W) in [0, 1] for a model taking ``shape`` = (C, H, W)."""
    if not isinstance(images, Tensor):
        raise InvalidImages(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise InvalidImages(f"images must have 4 dimensions (N, C, H, W), got shape {tuple(images.shape)}")
    if tuple(images.shape[1:]) != tuple(shape):
        raise InvalidImages(f"each image must have shape (C, H, W) = {tuple(shape)}, got {tuple(images.shape[1:])}")
    if images.shape[0] == 0:
        raise InvalidImages("no images given")
    if max_images is not None and images.shape[0] > max_images:
        raise InvalidImages(f"{images.shape[0]} images exceed the limit of {max_images} per request")
    if not images.is_floating_point():
        raise InvalidImages(f"images must be floating point in [0, 1], got {images.dtype}")
    if not torch.isfinite(images).all():
        raise InvalidImages("images contain NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 1:
        raise InvalidImages(f"pixel values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return images


@dataclass
class ScreenResult:
    """Screening of N images.

    Attributes
    ----------
    predictions : (N,) int64 class indices.
    probabilities : (N, K) float32 softmax.
    scores : (N,) float, adversarial score in [0, 1].
    flags : (N,) bool, ``scores > threshold``.
    threshold : the detector's calibrated threshold.
    active_ratio : (N,) fraction of gated filters that ran.
    flops_ratio : (N,) executed MACs relative to the dense twin.
    paths : (N, G) uint8, the hard path (calculation path) of each image.
    departure : (N, L) per-layer Hamming distance between the path and the predicted class's prototype.
    """

    predictions: np.ndarray
    probabilities: np.ndarray
    scores: np.ndarray
    flags: np.ndarray
    threshold: float
    active_ratio: np.ndarray
    flops_ratio: np.ndarray
    paths: np.ndarray
    departure: np.ndarray

    def __len__(self) -> int:
        return len(self.predictions)


ENGINES = ("masked", "skipping")


class Screener:
    """A model, its class prototypes and its fitted path detector, ready to screen images.

    ``engine`` picks how the model runs: ``"masked"`` (default) is the model itself, every filter computed
    and the off ones multiplied by zero; ``"skipping"`` is :class:`~detector.acceleration.SkippingEngine`,
    which computes only the filters whose gate is on (BatchNorm folded at construction, so later changes
    to the model's weights are not seen). Results agree to float32 rounding (relative 1e-5).
    """

    def __init__(
        self,
        model: DecoupledNet,
        prototypes: Prototypes,
        detector: FeatureDetector,
        classes: list[str],
        batch_size: int = 256,
        engine: str = "masked",
    ) -> None:
        if not model.gated:
            raise ValueError("screening needs a gated model")
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} must be one of {ENGINES}")
        self.model = model.eval()
        self.engine = engine
        self._forward_path = model.forward_path
        if engine == "skipping":
            from .acceleration import SkippingEngine

            self._forward_path = SkippingEngine(model).forward_path
        self.prototypes = prototypes
        self.detector = detector
        self.classes = classes
        self.batch_size = batch_size
        self.input_shape = (model.in_channels, model.input_size, model.input_size)
        self.layer_names = model.layer_names

    @classmethod
    def from_bundle(cls, bundle, **kwargs) -> Screener:
        protos, det = bundle.fitted()
        return cls(bundle.model, protos, det, bundle.classes, **kwargs)

    @property
    def threshold(self) -> float:
        return float(self.detector.threshold_)

    @torch.no_grad()
    def screen(self, images: Tensor, *, validate: bool = True) -> ScreenResult:
        """Screen images (N, C, H, W) in [0, 1]. Raises :class:`InvalidImages` for bad input.

        ``validate=False`` skips :func:`check_images`, for callers that already ran it on these images.
        """
        if validate:
            check_images(images, self.input_shape)
        device = next(self.model.parameters()).device
        parts: dict[str, list] = {k: [] for k in ("logits", "X", "active", "flops", "paths", "departure")}
        for start in range(0, len(images), self.batch_size):
            x = images[start : start + self.batch_size].to(device)
            out = self._forward_path(x)
            X, dist = path_features(out, self.prototypes, x)
            parts["logits"].append(out.logits.cpu())
            parts["X"].append(X.cpu())
            parts["active"].append(out.hard_path.mean(1).cpu())
            parts["flops"].append(out.flops_ratio.cpu())
            parts["paths"].append(out.hard_path.cpu().to(torch.uint8))
            parts["departure"].append(dist[:, :, 0].cpu())
        cat = {k: torch.cat(v) for k, v in parts.items()}
        scores = self.detector.decision_function(cat["X"].double().numpy())
        probs = cat["logits"].softmax(1)
        return ScreenResult(
            predictions=probs.argmax(1).numpy(),
            probabilities=probs.float().numpy(),
            scores=scores,
            flags=scores > self.threshold,
            threshold=self.threshold,
            active_ratio=cat["active"].numpy(),
            flops_ratio=cat["flops"].numpy(),
            paths=cat["paths"].numpy(),
            departure=cat["departure"].numpy(),
        )
