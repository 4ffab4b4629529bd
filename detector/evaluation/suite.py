"""``pathguard evaluate``: the offline attack-evaluation suite, single-machine or sharded."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..attacks import AttackSpec, parse_attacks
from ..bundle import Bundle, load_bundle
from ..reporting import report_header
from ..splits import Splits, accuracy, bundle_splits
from .adversarial import compute_all, compute_shard, load_shards
from .analysis import analyze
from .config import EvalConfig
from .images import ImageSets, select_images
from .report import write_report

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What every evaluation step starts from: the bundle, its splits, the chosen images and the attacks."""

    bundle: Bundle
    splits: Splits
    sets: ImageSets
    specs: list[AttackSpec]


def _prepare(cfg: EvalConfig) -> Prepared:
    bundle = load_bundle(cfg.bundle)
    splits = bundle_splits(bundle.meta, cfg.data_root)
    sets = select_images(
        bundle.model,
        splits,
        n=cfg.n,
        n_fit=cfg.n_fit,
        n_calibration=cfg.n_calibration,
        n_reference=cfg.n_reference,
        seed=cfg.seed,
    )
    return Prepared(bundle, splits, sets, parse_attacks(cfg.attacks))


def run_shard(cfg: EvalConfig, shard: int, n_shards: int, out: Path, progress: bool = True) -> Path:
    """Compute the adversarial images of shard ``shard`` of ``n_shards``."""
    p = _prepare(cfg)
    images, labels = p.sets.attack_images
    return compute_shard(
        p.bundle.model,
        images,
        labels,
        p.specs,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        shard=shard,
        n_shards=n_shards,
        out=out,
        config=cfg.to_dict(),
        digest=cfg.digest(),
        progress=progress,
    )


def run(cfg: EvalConfig, out: Path, progress: bool = True) -> dict:
    """The whole evaluation on this machine."""
    t0 = time.perf_counter()
    p = _prepare(cfg)
    images, labels = p.sets.attack_images
    adv, seconds = compute_all(
        p.bundle.model,
        p.bundle.model_digest,
        images,
        labels,
        p.specs,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        cache_dir=cfg.cache_dir,
        progress=progress,
    )
    return _finish(cfg, out, p, adv, seconds, t0)


def merge(out: Path, cfg: EvalConfig | None = None, progress: bool = True) -> dict:
    """Merge the shards under ``out/shards`` and write the report a single run would write."""
    t0 = time.perf_counter()
    shard_cfg, adv, seconds = load_shards(out)
    shard_cfg = EvalConfig.from_dict(shard_cfg)
    if cfg is not None and cfg.digest() != shard_cfg.digest():
        raise ValueError("the shards were computed with other settings than the ones given to merge")
    cfg = cfg or shard_cfg
    p = _prepare(cfg)
    missing = {s.label for s in p.specs} - set(adv)
    if missing:
        raise ValueError(f"the shards hold no adversarial images for {sorted(missing)}")
    return _finish(cfg, out, p, adv, seconds, t0)


def _finish(
    cfg: EvalConfig, out: Path, p: Prepared, adv: dict[str, Tensor], attack_seconds: dict[str, float], t0: float
) -> dict:
    """Analyse the adversarial images ``adv`` (by attack label) and write the report to ``out``."""
    bundle, splits, sets, specs = p.bundle, p.splits, p.sets, p.specs
    out.mkdir(parents=True, exist_ok=True)
    t_attacks = time.perf_counter() - t0
    body, scores = analyze(cfg, bundle, sets, specs, adv)
    t1 = time.perf_counter()
    test_accuracy = accuracy(bundle.model, splits.test)
    stages = {"images and attacks": t_attacks, **body["timing"]["stages"], "clean accuracy": time.perf_counter() - t1}
    report = {
        **report_header(bundle, cfg.bundle, cfg.to_dict()),
        "clean_accuracy": test_accuracy,
        "clean_accuracy_n": len(splits.test),
        "images": {
            "calibration": sets.calibration.describe(),
            "fit": sets.fit.describe(),
            "eval": sets.eval.describe(),
            "reference": sets.reference.describe() | {"indices": "first n"},
        },
        **body,
    }
    t1 = time.perf_counter()
    if cfg.plots:
        from .plots import write_heatmap, write_plots  # matplotlib only when drawing (the server image has none)

        thresholds = {d: info["threshold"] for d, info in body["detectors"].items()}
        report["plots"] = [write_heatmap(out, {**report, "results": body["results"]})] + write_plots(
            out, scores, body["results"], thresholds, [s.label for s in specs]
        )
    stages["plots"] = time.perf_counter() - t1
    report["timing"]["stages"] = {k: round(v, 1) for k, v in stages.items()}
    report["timing"]["attack_seconds"] = attack_seconds
    report["timing"]["total_seconds"] = time.perf_counter() - t0
    write_report(out, report)
    log.info("wrote %s", out / "report.md")
    return report
