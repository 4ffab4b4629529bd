"""Dataset registry: where each supported dataset lives on disk and how it is read.

Every loader returns :class:`ImageDataset` splits ``"train"`` and ``"test"``. Fashion-MNIST is the
default; it is found where Debian's ``dataset-fashion-mnist`` puts it, or under ``data_root``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageDataset, to_uint8
from .formats import read_cifar_batch, read_cifar_meta, read_idx, read_npz

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetNotFound(FileNotFoundError):
    """The dataset's files are not where we looked; the message says where and what to do."""


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _idx_dataset(name: str, dirs: list[Path], classes: list[str], split: str, hint: str) -> ImageDataset:
    img_stem, lbl_stem = _IDX_FILES[split]
    img, lbl = _find_idx(dirs, img_stem), _find_idx(dirs, lbl_stem)
    if img is None or lbl is None:
        looked = ", ".join(str(d) for d in dirs)
        raise DatasetNotFound(f"{name}: {img_stem}[.gz] not found (looked in {looked}). {hint}")
    images = torch.from_numpy(read_idx(img).copy())[:, None]
    labels = torch.from_numpy(read_idx(lbl).astype(np.int64))
    return ImageDataset(images, labels, list(classes), f"{name}:{split}")


def fashion_mnist_dirs(root: Path | None) -> list[Path]:
    dirs = [] if root is None else [root / "FashionMNIST" / "raw", root / "fashion-mnist", root]
    return dirs + [DEBIAN_FASHION_MNIST]


def load_fashion_mnist(split: str, root: Path | None = None) -> ImageDataset:
    return _idx_dataset(
        "fashion-mnist",
        fashion_mnist_dirs(root),
        FASHION_MNIST_CLASSES,
        split,
        "Run `pathguard data fetch` (installs Debian's dataset-fashion-mnist or downloads it).",
    )


def load_mnist(split: str, root: Path | None = None) -> ImageDataset:
    if root is None:
        raise DatasetNotFound("mnist: give --data-root, a folder holding the four IDX files (or MNIST/raw/)")
    return _idx_dataset(
        "mnist",
        [root / "MNIST" / "raw", root / "mnist", root],
        [str(i) for i in range(10)],
        split,
        "Put the four MNIST IDX files (.gz or not) there.",
    )


def load_cifar10(split: str, root: Path | None = None) -> ImageDataset:
    if root is None:
        raise DatasetNotFound("cifar10: give --data-root, the folder holding cifar-10-batches-py/")
    base = next((d for d in (root / "cifar-10-batches-py", root) if (d / "test_batch").is_file()), None)
    if base is None:
        raise DatasetNotFound(
            f"cifar10: no cifar-10-batches-py/test_batch under {root}; unpack cifar-10-python.tar.gz there"
        )
    files = [base / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [base / "test_batch"]
    parts = [read_cifar_batch(f) for f in files if f.is_file()]
    if not parts:
        raise DatasetNotFound(f"cifar10: no {split} batches in {base}")
    classes = read_cifar_meta(base / "batches.meta") if (base / "batches.meta").is_file() else CIFAR10_CLASSES
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, f"cifar10:{split}")


def load_image_folder(split: str, root: Path | None = None) -> ImageDataset:
    """``root/<split>/<class>/*.png|jpg`` through torchvision's ImageFolder; all images one size."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    if root is None or not (root / split).is_dir():
        raise DatasetNotFound(f"image-folder: expected {root}/{split}/<class>/<image files>")
    folder = ImageFolder(str(root / split))
    tensors = [pil_to_tensor(folder.loader(path)) for path, _ in folder.samples]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"image-folder: images must share one size, found {sorted(shapes)[:3]}...")
    labels = torch.tensor([label for _, label in folder.samples])
    return ImageDataset(torch.stack(tensors), labels, list(folder.classes), f"image-folder:{split}")


def load_npz(split: str, root: Path | None = None) -> ImageDataset:
    """``root/train.npz`` and ``root/test.npz`` (or ``root`` itself as one file for both)."""
    if root is None:
        raise DatasetNotFound("npz: give --data-root, a folder with train.npz/test.npz or one .npz file")
    path = root if root.is_file() else root / f"{split}.npz"
    if not path.is_file():
        raise DatasetNotFound(f"npz: {path} not found")
    images, labels, classes = read_npz(path)
    classes = classes or [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
    return ImageDataset(torch.from_numpy(to_uint8(images)), torch.from_numpy(labels), classes, f"npz:{split}")


DATASETS: dict[str, Callable[[str, Path | None], ImageDataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "image-folder": load_image_folder,
    "npz": load_npz,
}


def load_dataset(name: str, split: str, root: str | Path | None = None) -> ImageDataset:
    """Load split ``"train"`` or ``"test"`` of a registered dataset."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not supported; choose from {sorted(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    return DATASETS[name](split, None if root is None else Path(root))
