"""Running attacks: batched, seeded per batch, with a progress bar, cached to ``.npz``.

Every batch is seeded by ``(seed, batch index)`` and batches are fixed slices of the image list, so
the adversarial image of an input depends only on the batch it falls in: a sharded run computes
exactly what a single run does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .registry import AttackSpec

log = logging.getLogger(__name__)


@dataclass
class AttackResult:
    """Adversarial images for ``images`` (same order), and what the attack achieved."""

    spec: AttackSpec
    adversarial: Tensor  # (N, C, H, W) in [0, 1]
    labels: Tensor  # (N,) true labels
    seconds: float

    def perturbation(self, clean: Tensor) -> dict[str, Tensor]:
        d = (self.adversarial - clean).flatten(1)
        return {"l2": d.norm(dim=1), "linf": d.abs().amax(dim=1)}


def _batch_seed(seed: int, batch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{batch}".encode()).digest()[:4], "little")


def run_attack(
    model: torch.nn.Module,
    images: Tensor,
    labels: Tensor,
    spec: AttackSpec,
    *,
    seed: int = 0,
    batch_size: int = 250,
    batches: list[int] | None = None,
    progress: bool = True,
) -> AttackResult:
    """Attack ``images`` (N, C, H, W) in [0, 1] with true ``labels`` (N,).

    ``batches`` restricts the run to those batch indices (for sharding); the other rows of the result
    are left equal to the clean images.
    """
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"images must be (N, C, H, W) with N labels; got {tuple(images.shape)} and {len(labels)}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError("images must lie in [0, 1]; normalisation belongs to the model")
    device = next(model.parameters()).device
    model.eval()
    n_batches = (len(images) + batch_size - 1) // batch_size
    todo = range(n_batches) if batches is None else [b for b in batches if b < n_batches]
    adv = images.clone()
    t0 = time.perf_counter()
    for b in tqdm(todo, desc=spec.label, disable=not progress, file=sys.stderr, leave=False):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        torch.manual_seed(_batch_seed(seed, b))
        attack = spec.build(model, seed=_batch_seed(seed, b))
        out = attack(images[sl].to(device), labels[sl].to(device)).detach().cpu()
        adv[sl] = out.clamp_(0, 1)
    return AttackResult(spec, adv, labels.clone(), time.perf_counter() - t0)


def cache_key(model_digest: str, images: Tensor, spec: AttackSpec, seed: int, batch_size: int) -> str:
    h = hashlib.sha256()
    h.update(model_digest.encode())
    h.update(spec.canonical().encode())
    h.update(f"{seed}:{batch_size}:{tuple(images.shape)}".encode())
    h.update(images.numpy().tobytes())
    return h.hexdigest()[:20]


def save_result(path: Path, result: AttackResult, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "attack": result.spec.name,
        "params": result.spec.params,
        "label": result.spec.label,
        "seconds": result.seconds,
        **(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        adversarial=result.adversarial.numpy().astype(np.float32),
        labels=result.labels.numpy(),
        meta=np.array(json.dumps(meta)),
    )
    tmp.replace(path)


def read_result(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(adversarial images, labels, metadata) of an ``.npz`` written by :func:`save_result`; the metadata is
    empty when the file has none."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z else {}
        return z["adversarial"], z["labels"], meta


def load_result(path: Path, spec: AttackSpec) -> AttackResult:
    adversarial, labels, meta = read_result(path)
    if meta.get("attack") != spec.name or meta.get("params") != json.loads(spec.canonical())["params"]:
        raise ValueError(f"{path}: cached attack {meta.get('attack')} {meta.get('params')} is not {spec.canonical()}")
    return AttackResult(spec, torch.from_numpy(adversarial), torch.from_numpy(labels), float(meta["seconds"]))


def cached_attack(
    model: torch.nn.Module,
    model_digest: str,
    images: Tensor,
    labels: Tensor,
    spec: AttackSpec,
    *,
    cache_dir: Path | None,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = True,
) -> AttackResult:
    """:func:`run_attack`, reusing ``cache_dir/<attack>-<key>.npz`` when the same attack was run before."""
    if cache_dir is None:
        return run_attack(model, images, labels, spec, seed=seed, batch_size=batch_size, progress=progress)
    path = Path(cache_dir) / f"{spec.name}-{cache_key(model_digest, images, spec, seed, batch_size)}.npz"
    if path.is_file():
        log.info("reusing cached %s from %s", spec.label, path)
        return load_result(path, spec)
    result = run_attack(model, images, labels, spec, seed=seed, batch_size=batch_size, progress=progress)
    save_result(path, result)
    return result
