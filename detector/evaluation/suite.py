"""``pathguard evaluate``: the offline attack-evaluation suite, single-machine or sharded."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .. import __version__
from ..attacks import parse_attacks
from ..bundle import load_bundle
from ..splits import bundle_splits
from .adversarial import compute_all, compute_shard, load_shards
from .analysis import analyze
from .config import EvalConfig
from .images import select_images
from .plots import write_heatmap, write_plots
from .report import write_report

log = logging.getLogger(__name__)


def _prepare(cfg: EvalConfig):
    bundle = load_bundle(cfg.bundle)
    splits = bundle_splits(bundle.meta, cfg.data_root)
    sets = select_images(bundle.model, splits, n=cfg.n, n_fit=cfg.n_fit, n_calibration=cfg.n_calibration,
                         n_reference=cfg.n_reference, seed=cfg.seed)
    return bundle, splits, sets, parse_attacks(cfg.attacks)


@torch.no_grad()
def _accuracy(model, data, batch: int = 1000) -> float:
    correct = 0
    for i in range(0, len(data), batch):
        correct += int((model(data.float_images(slice(i, i + batch))).argmax(1) == data.labels[i:i + batch]).sum())
    return correct / len(data)


def run_shard(cfg: EvalConfig, shard: int, n_shards: int, out: Path, progress: bool = True) -> Path:
    """Compute the adversarial images of shard ``shard`` of ``n_shards``."""
    bundle, _, sets, specs = _prepare(cfg)
    images, labels = sets.attack_images
    return compute_shard(bundle.model, images, labels, specs, seed=cfg.seed, batch_size=cfg.batch_size, shard=shard,
                         n_shards=n_shards, out=out, config=cfg.to_dict(), digest=cfg.digest(), progress=progress)


def run(cfg: EvalConfig, out: Path, progress: bool = True) -> dict:
    """The whole evaluation on this machine."""
    t0 = time.perf_counter()
    bundle, splits, sets, specs = _prepare(cfg)
    images, labels = sets.attack_images
    adv, seconds = compute_all(bundle.model, bundle.meta["files"]["model.safetensors"], images, labels, specs,
                               seed=cfg.seed, batch_size=cfg.batch_size, cache_dir=cfg.cache_dir, progress=progress)
    return _finish(cfg, out, bundle, splits, sets, specs, adv, seconds, t0)


def merge(out: Path, cfg: EvalConfig | None = None, progress: bool = True) -> dict:
    """Merge the shards under ``out/shards`` and write the report a single run would write."""
    t0 = time.perf_counter()
    shard_cfg, adv, seconds = load_shards(out)
    shard_cfg = EvalConfig.from_dict(shard_cfg)
    if cfg is not None and cfg.digest() != shard_cfg.digest():
        raise ValueError("the shards were computed with other settings than the ones given to merge")
    cfg = cfg or shard_cfg
    bundle, splits, sets, specs = _prepare(cfg)
    missing = {s.label for s in specs} - set(adv)
    if missing:
        raise ValueError(f"the shards hold no adversarial images for {sorted(missing)}")
    return _finish(cfg, out, bundle, splits, sets, specs, adv, seconds, t0)


def _finish(cfg, out, bundle, splits, sets, specs, adv, attack_seconds, t0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    body, scores = analyze(cfg, bundle, sets, specs, adv)
    report = {
        "pathguard_version": __version__,
        "config": cfg.to_dict(),
        "bundle": {"path": str(cfg.bundle), "name": bundle.name, "arch": bundle.meta["arch"],
                   "model_sha256": bundle.meta["files"]["model.safetensors"]},
        "clean_accuracy": _accuracy(bundle.model, splits.test),
        "clean_accuracy_n": len(splits.test),
        "images": {"calibration": sets.calibration.describe(), "fit": sets.fit.describe(),
                   "eval": sets.eval.describe(), "reference": sets.reference.describe() | {"indices": "first n"}},
        **body,
    }
    if cfg.plots:
        thresholds = {d: info["threshold"] for d, info in body["detectors"].items()}
        report["plots"] = [write_heatmap(out, {**report, "results": body["results"]})] + write_plots(
            out, scores, body["results"], thresholds, [s.label for s in specs])
    report["timing"]["attack_seconds"] = attack_seconds
    report["timing"]["total_seconds"] = time.perf_counter() - t0
    write_report(out, report)
    log.info("wrote %s", out / "report.md")
    return report
