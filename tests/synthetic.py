"""A tiny synthetic image dataset and a bundle trained on it, for fast tests.

Class k of 4 is a bright 4x4 square at one of four positions on a noisy 16x16 grey image, so a small
model learns it in a few steps and attacks have something to move.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from detector.fitting import FitConfig, fit_bundle_detector
from detector.models import GateConfig
from detector.training import TrainConfig, train

CORNERS = [(2, 2), (2, 10), (10, 2), (10, 10)]


def make_images(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CORNERS), n)
    images = rng.uniform(0.0, 0.4, (n, 1, size, size)).astype(np.float32)
    for i, k in enumerate(labels):
        r, c = CORNERS[k]
        images[i, 0, r : r + 4, c : c + 4] = rng.uniform(0.45, 0.65)
    return images, labels.astype(np.int64)


def correct_images(model, n: int, seed: int):
    """Up to n synthetic images (as tensors, with labels) that ``model`` classifies correctly."""
    x, y = make_images(3 * n, seed=seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok][:n], y[ok][:n]


def write_dataset(root: Path, n_train: int = 800, n_test: int = 300) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    classes = np.array(["top-left", "top-right", "bottom-left", "bottom-right"])
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x, y = make_images(n, seed)
        np.savez(root / f"{split}.npz", images=x, labels=y, classes=classes)
    return root


def tiny_config(data: Path, **overrides) -> TrainConfig:
    """The tiny recipe: vgg8 on the synthetic set in ``data``, 3 epochs (fields overridable)."""
    base = dict(
        dataset="npz",
        data_root=str(data),
        epochs=3,
        batch_size=64,
        lr=3e-3,
        val_size=200,
        augment=(),
        threads=1,
        w_sparsity=0.3,
        gate=GateConfig(init_bias=0.5),
    )
    return TrainConfig(**{**base, **overrides})


def make_bundle(root: Path, *, fit_detector: bool = True, gated: bool = True) -> Path:
    """Train vgg8 on the synthetic set for 3 epochs and (optionally) fit its detector."""
    data = write_dataset(root / "data")
    cfg = tiny_config(data, gated=gated)
    bundle = root / ("bundle" if gated else "dense")
    train(cfg, bundle, progress=False)
    if fit_detector and gated:
        # logistic regression: the adaptive tests need its exact gradient; the ensemble has its own tests
        fit_bundle_detector(
            FitConfig(
                str(bundle),
                "fgsm:eps=0.15,pgd:eps=0.15;steps=5",
                classifier="logreg",
                n_fit=60,
                n_calibration=60,
                prototype_images=400,
            ),
            progress=False,
        )
    return bundle
