"""The expensive, shardable part of an evaluation: computing the adversarial images.

Attack batches are fixed slices of the attacked images; shard I of N computes batches b with
``b % N == I``. Each batch is seeded by its index (see :mod:`detector.attacks.runner`), so merging the
shards gives exactly the adversarial images a single run computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..attacks import AttackSpec, cached_attack, run_attack


def shard_batches(n_images: int, batch_size: int, shard: int, n_shards: int) -> list[int]:
    n_batches = (n_images + batch_size - 1) // batch_size
    return [b for b in range(n_batches) if b % n_shards == shard]


def shard_rows(n_images: int, batch_size: int, batches: list[int]) -> Tensor:
    rows = [torch.arange(b * batch_size, min((b + 1) * batch_size, n_images)) for b in batches]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


def compute_all(
    model,
    digest: str,
    images: Tensor,
    labels: Tensor,
    specs: list[AttackSpec],
    *,
    seed: int,
    batch_size: int,
    cache_dir: str | None,
    progress: bool,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    adv, seconds = {}, {}
    for spec in specs:
        res = cached_attack(
            model,
            digest,
            images,
            labels,
            spec,
            cache_dir=Path(cache_dir) if cache_dir else None,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
        adv[spec.label], seconds[spec.label] = res.adversarial, res.seconds
    return adv, seconds


def shard_path(out: Path, shard: int, n_shards: int) -> Path:
    return out / "shards" / f"shard-{shard}-of-{n_shards}.npz"


def compute_shard(
    model,
    images: Tensor,
    labels: Tensor,
    specs: list[AttackSpec],
    *,
    seed: int,
    batch_size: int,
    shard: int,
    n_shards: int,
    out: Path,
    config: dict,
    digest: str,
    progress: bool,
) -> Path:
    """Attack this shard's batches and write them to ``out/shards/shard-I-of-N.npz`` (+ ``.json``)."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard}/{n_shards}: the index must be in [0, {n_shards})")
    batches = shard_batches(len(images), batch_size, shard, n_shards)
    rows = shard_rows(len(images), batch_size, batches)
    arrays: dict[str, np.ndarray] = {"rows": rows.numpy()}
    seconds = {}
    for spec in specs:
        res = run_attack(
            model, images, labels, spec, seed=seed, batch_size=batch_size, batches=batches, progress=progress
        )
        arrays[f"adv:{spec.label}"] = res.adversarial[rows].numpy()
        seconds[spec.label] = res.seconds
    path = shard_path(out, shard, n_shards)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path.with_suffix(".tmp.npz"), **arrays)
    path.with_suffix(".tmp.npz").replace(path)
    path.with_suffix(".json").write_text(
        json.dumps(
            {
                "shard": shard,
                "n_shards": n_shards,
                "digest": digest,
                "config": config,
                "n_images": len(images),
                "batches": batches,
                "attack_seconds": seconds,
            },
            indent=2,
        )
    )
    return path


def load_shards(out: Path) -> tuple[dict, dict[str, Tensor], dict[str, float]]:
    """Read every ``shard-*-of-N.npz`` under ``out/shards``; check they form one complete run."""
    metas = sorted((out / "shards").glob("shard-*-of-*.json"))
    if not metas:
        raise ValueError(f"no shard files under {out / 'shards'}")
    infos = [json.loads(p.read_text()) for p in metas]
    n_shards, digest = infos[0]["n_shards"], infos[0]["digest"]
    for info in infos:
        if info["n_shards"] != n_shards or info["digest"] != digest:
            raise ValueError(
                f"shard files under {out / 'shards'} come from different runs "
                f"(n_shards {info['n_shards']} vs {n_shards}, digest {info['digest']} vs {digest})"
            )
    present = sorted(info["shard"] for info in infos)
    if present != list(range(n_shards)):
        missing = sorted(set(range(n_shards)) - set(present))
        raise ValueError(f"shards {missing} of {n_shards} are missing under {out / 'shards'}")
    n_images = infos[0]["n_images"]
    adv: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    covered = torch.zeros(n_images, dtype=torch.bool)
    for info in infos:
        with np.load(shard_path(out, info["shard"], n_shards), allow_pickle=False) as z:
            rows = torch.from_numpy(z["rows"])
            covered[rows] = True
            for key in z.files:
                if key.startswith("adv:"):
                    label = key[4:]
                    block = torch.from_numpy(z[key])
                    if label not in adv:
                        adv[label] = torch.zeros((n_images, *block.shape[1:]), dtype=block.dtype)
                    adv[label][rows] = block
        for label, s in info["attack_seconds"].items():
            seconds[label] = seconds.get(label, 0.0) + s
    if not covered.all():
        raise ValueError(f"shards under {out / 'shards'} leave {int((~covered).sum())} images unattacked")
    return infos[0]["config"], adv, seconds
