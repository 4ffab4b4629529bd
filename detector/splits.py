"""The image sets of a bundle's dataset: its training split, held-out validation split and test set.

Re-derived from ``bundle.json`` (dataset, split seed, validation size), so every command sees the same
images the model was trained without.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .data import ImageDataset, load_dataset, train_val_split
from .models import DecoupledNet


@dataclass
class Splits:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset


def bundle_splits(meta: dict, data_root: str | None = None) -> Splits:
    ds = meta["dataset"]
    root = data_root or meta.get("train_config", {}).get("data_root")
    full = load_dataset(ds["name"], "train", root)
    if "fingerprint" in ds and full.fingerprint() != ds["fingerprint"]:
        raise ValueError(
            f"dataset {ds['name']} at {root or 'its default place'} is not the one the bundle was "
            "trained on (fingerprint differs)"
        )
    tr, va = train_val_split(len(full), int(ds["val_images"]), int(ds["split_seed"]))
    return Splits(full.subset(tr, ":train"), full.subset(va, ":val"), load_dataset(ds["name"], "test", root))


@torch.no_grad()
def accuracy(model: DecoupledNet, data: ImageDataset, batch_size: int = 1000) -> float:
    """Fraction of ``data`` the model classifies correctly, in eval mode."""
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        idx = slice(start, start + batch_size)
        correct += int((model(data.float_images(idx).to(device)).argmax(1).cpu() == data.labels[idx]).sum())
    return correct / len(data)


@torch.no_grad()
def correctly_classified(
    model: DecoupledNet, data: ImageDataset, n: int, *, seed: int = 0, skip: int = 0, batch_size: int = 500
) -> Tensor:
    """Positions in ``data`` of ``n`` images the model classifies correctly, in a seeded random order,
    after skipping the first ``skip`` such images (so that consecutive calls give disjoint sets)."""
    device = next(model.parameters()).device
    model.eval()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    chosen: list[Tensor] = []
    have, skipped = 0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ok = model(data.float_images(idx).to(device)).argmax(1).cpu() == data.labels[idx]
        good = idx[ok]
        if skipped < skip:
            drop = min(skip - skipped, len(good))
            good, skipped = good[drop:], skipped + drop
        chosen.append(good[: n - have])
        have += len(chosen[-1])
        if have >= n:
            break
    if have < n:
        raise ValueError(f"only {have} correctly classified images available in {data.name}, asked for {n}")
    return torch.cat(chosen)
