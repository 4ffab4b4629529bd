"""``pathguard fit-detector``: compute class prototypes and fit the bundle's path detector.

``classifier="ensemble"`` (the default) ships :class:`~detector.detectors.PathEnsembleDetector`: its
clean-only components are fitted on the first ``n_reference`` clean *training* images, and its
non-negative weights are chosen by worst per-family AUROC on correctly classified *validation* images and
their adversarial versions. A supervised classifier (``logreg``, ``rf``, ``gb``) instead learns from those
validation images directly. Either way the validation split is held out of training and disjoint from the
test set that ``evaluate`` reports on, and the threshold is calibrated on other clean validation images.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .attacks import AttackSpec, cached_attack, parse_attacks
from .bundle import BUNDLE_HELP, load_bundle, write_part
from .detectors import PathDetector, PathEnsembleDetector
from .detectors.record import DetectorRecord
from .features import GROUPS, extract_path_features
from .models import DecoupledNet
from .prototypes import Prototypes, compute_prototypes
from .splits import Splits, bundle_splits, correctly_classified

log = logging.getLogger(__name__)


def adversarial_training_set(
    model,
    protos,
    clean_images,
    labels,
    attacks: list[AttackSpec],
    *,
    digest: str,
    cache_dir: Path | None,
    seed: int,
    progress: bool,
):
    """Feature matrix of clean images plus their successful adversarial versions, labels (1 = adv), the
    column groups, per-attack statistics and the attack label of every row ("" for clean rows)."""
    clean = extract_path_features(model, protos, clean_images)
    blocks, ys, per_attack, source = [clean.X], [np.zeros(len(clean.X))], {}, [""] * len(clean.X)
    for spec in attacks:
        res = cached_attack(
            model, digest, clean_images, labels, spec, cache_dir=cache_dir, seed=seed, progress=progress
        )
        feats = extract_path_features(model, protos, res.adversarial)
        ok = (feats.logits.argmax(1) != labels).numpy()
        blocks.append(feats.X[ok])
        ys.append(np.ones(int(ok.sum())))
        source += [spec.label] * int(ok.sum())
        per_attack[spec.label] = {"success_rate": float(ok.mean()), "seconds": round(res.seconds, 1)}
    if sum(len(b) for b in ys[1:]) == 0:
        raise ValueError(
            f"no attack succeeded on the {len(clean.X)} fitting images ({per_attack}); give the attacks a larger budget"
        )
    return np.concatenate(blocks), np.concatenate(ys), clean.groups, per_attack, np.asarray(source)


@dataclass
class FitConfig:
    """What ``pathguard fit-detector`` fits: which attacks, which classifier on which path features, on how
    many validation images, calibrated to which false-positive rate."""

    bundle: str = field(default="", metadata={"help": BUNDLE_HELP})
    attacks: str = field(
        default="fgsm,pgd,pgdl2,cw,deepfool,square",
        metadata={
            "help": "attacks on validation images: what the ensemble's weights are chosen on (worst family), or what a "
            "supervised classifier learns from"
        },
    )
    classifier: str = field(
        default="ensemble",
        metadata={
            "choices": ("ensemble", "logreg", "rf", "gb"),
            "help": (
                "ensemble: clean-only path scores combined with weights >= 0 (default); else a supervised classifier"
            ),
        },
    )
    features: str = field(default=",".join(GROUPS), metadata={"help": "feature groups"})
    n_fit: int = field(default=1000, metadata={"help": "validation images to attack for fitting"})
    n_calibration: int = field(default=1000, metadata={"help": "clean validation images for the threshold"})
    target_fpr: float = 0.05
    seed: int = 0
    data_root: str | None = None
    cache_dir: str | None = field(default=None, metadata={"help": "reuse attacks computed before"})
    prototype_images: int = field(default=20000, metadata={"help": "training images the prototypes come from"})
    n_reference: int = field(
        default=20000, metadata={"help": "clean training images the ensemble's clean-only components are fitted on"}
    )

    def __post_init__(self) -> None:
        unknown = set(self.feature_groups) - set(GROUPS)
        if unknown or not self.feature_groups:
            raise ValueError(f"features={self.features!r} must name some of {list(GROUPS)}")
        for name in ("n_fit", "n_calibration", "prototype_images", "n_reference"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def feature_groups(self) -> list[str]:
        return [g for g in self.features.split(",") if g]


def _write_prototypes(cfg: FitConfig, model: DecoupledNet, splits: Splits) -> Prototypes:
    """Class prototypes from the first ``cfg.prototype_images`` training images, written into the bundle."""
    n_proto = min(cfg.prototype_images, len(splits.train))
    protos = compute_prototypes(model, splits.train.subset(torch.arange(n_proto)))
    write_part(
        cfg.bundle,
        "prototypes",
        tensors=protos.to_state()[0],
        info={**protos.to_state()[1], "images": f"first {n_proto} of {splits.train.name}"},
    )
    return protos


def _fit_detector(
    cfg: FitConfig,
    model: DecoupledNet,
    protos: Prototypes,
    splits: Splits,
    attacks: list[AttackSpec],
    training: tuple[np.ndarray, np.ndarray, list[str], np.ndarray],
    X_cal: np.ndarray,
) -> tuple[PathDetector | PathEnsembleDetector, dict]:
    """The detector ``cfg.classifier`` names, calibrated on ``X_cal``, and what the bundle records of it beyond
    :class:`DetectorRecord`. A supervised one learns from the validation rows ``training`` (X, y, groups, source
    attack); the ensemble fits on clean reference training images and chooses its weights on those rows by family."""
    X, y, groups, source = training
    if cfg.classifier != "ensemble":
        det = PathDetector(
            feature_groups=cfg.feature_groups,
            classifier=cfg.classifier,
            target_fpr=cfg.target_fpr,
            random_state=cfg.seed,
        ).fit(X, y, groups=groups, X_calibration=X_cal)
        return det, {}
    n_ref = min(cfg.n_reference, len(splits.train))
    X_ref = extract_path_features(model, protos, splits.train.float_images(torch.arange(n_ref))).X
    families = {a.label: a.family for a in attacks}
    validation = (
        X[y == 0],
        {f: X[np.isin(source, [a for a, g in families.items() if g == f])] for f in sorted(set(families.values()))},
    )
    det = PathEnsembleDetector(target_fpr=cfg.target_fpr, random_state=cfg.seed).fit(
        X_ref, groups=groups, layer_sizes=protos.layer_sizes, X_calibration=X_cal, validation=validation
    )
    extra = {
        "reference_images": {"set": splits.train.name, "n": n_ref, "which": "first n"},
        "weights": dict(zip(det.components, det.weights_.tolist())),
    }
    return det, extra


def fit_bundle_detector(cfg: FitConfig, progress: bool = True) -> dict:
    """Fit prototypes and the detector of the bundle ``cfg.bundle`` and write them into it."""
    attacks, seed = parse_attacks(cfg.attacks), cfg.seed
    t0 = time.perf_counter()
    bundle = load_bundle(cfg.bundle)
    model = bundle.model
    splits = bundle_splits(bundle.meta, cfg.data_root)
    protos = _write_prototypes(cfg, model, splits)

    fit_idx = correctly_classified(model, splits.val, cfg.n_fit, seed=seed)
    cal_idx = correctly_classified(model, splits.val, cfg.n_calibration, seed=seed, skip=cfg.n_fit)
    X, y, groups, per_attack, source = adversarial_training_set(
        model,
        protos,
        splits.val.float_images(fit_idx),
        splits.val.labels[fit_idx],
        attacks,
        digest=bundle.model_digest,
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
        seed=seed,
        progress=progress,
    )
    X_cal = extract_path_features(model, protos, splits.val.float_images(cal_idx)).X
    det, extra = _fit_detector(cfg, model, protos, splits, attacks, (X, y, groups, source), X_cal)
    tensors, info = det.to_state()
    info.update(extra)
    info.update(
        DetectorRecord(
            classifier=cfg.classifier,
            feature_groups=cfg.feature_groups,
            target_fpr=cfg.target_fpr,
            attacks=attacks,
            fit_images={
                "set": splits.val.name,
                "n_clean": int(len(fit_idx)),
                "n_adversarial": int(y.sum()),
                "seed": seed,
            },
            calibration_images={"set": splits.val.name, "n": int(len(cal_idx)), "skip": cfg.n_fit, "seed": seed},
            per_attack=per_attack,
            fit_seconds=round(time.perf_counter() - t0, 1),
        ).to_info()
    )
    write_part(cfg.bundle, "detector", tensors=tensors, info=info)
    log.info(
        "fitted %s detector on %d clean + %d adversarial images; threshold %.4f",
        cfg.classifier,
        int((y == 0).sum()),
        int(y.sum()),
        det.threshold_,
    )
    return info
