"""Datasets as in-memory uint8 tensors; images reach models as floats in [0, 1]."""

from .dataset import ImageDataset, train_val_split
from .fetch import fetch_fashion_mnist
from .sources import DATASETS, DatasetNotFound, load_dataset

__all__ = ["DATASETS", "DatasetNotFound", "ImageDataset", "fetch_fashion_mnist", "load_dataset", "train_val_split"]
