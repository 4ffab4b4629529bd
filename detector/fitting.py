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
from pathlib import Path

import numpy as np
import torch

from .attacks import AttackSpec, cached_attack
from .bundle import load_bundle, write_part
from .detectors import PathDetector, PathEnsembleDetector
from .features import GROUPS, extract_path_features
from .prototypes import compute_prototypes
from .splits import bundle_splits, correctly_classified

log = logging.getLogger(__name__)


def adversarial_training_set(model, protos, clean_images, labels, attacks: list[AttackSpec], *, digest: str,
                             cache_dir: Path | None, seed: int, progress: bool):
    """Feature matrix of clean images plus their successful adversarial versions, labels (1 = adv), the
    column groups, per-attack statistics and the attack label of every row ("" for clean rows)."""
    clean = extract_path_features(model, protos, clean_images)
    blocks, ys, per_attack, source = [clean.X], [np.zeros(len(clean.X))], {}, [""] * len(clean.X)
    for spec in attacks:
        res = cached_attack(model, digest, clean_images, labels, spec, cache_dir=cache_dir, seed=seed,
                            progress=progress)
        feats = extract_path_features(model, protos, res.adversarial)
        ok = (feats.logits.argmax(1) != labels).numpy()
        blocks.append(feats.X[ok])
        ys.append(np.ones(int(ok.sum())))
        source += [spec.label] * int(ok.sum())
        per_attack[spec.label] = {"success_rate": float(ok.mean()), "seconds": round(res.seconds, 1)}
    if sum(len(b) for b in ys[1:]) == 0:
        raise ValueError(f"no attack succeeded on the {len(clean.X)} fitting images ({per_attack}); "
                         "give the attacks a larger budget")
    return np.concatenate(blocks), np.concatenate(ys), clean.groups, per_attack, np.asarray(source)


def fit_bundle_detector(bundle_path: str | Path, attacks: list[AttackSpec], *, n_fit: int = 1000,
                        n_calibration: int = 1000, classifier: str = "ensemble", feature_groups=GROUPS,
                        target_fpr: float = 0.05, seed: int = 0, data_root: str | None = None,
                        cache_dir: Path | None = None, prototype_images: int = 20000, n_reference: int = 20000,
                        progress: bool = True) -> dict:
    """Fit prototypes and the detector of the bundle at ``bundle_path`` and write them into it."""
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_path)
    model, meta = bundle.model, bundle.meta
    splits = bundle_splits(meta, data_root)
    n_proto = min(prototype_images, len(splits.train))
    protos = compute_prototypes(model, splits.train.subset(torch.arange(n_proto)))
    write_part(bundle_path, "prototypes", tensors=protos.to_state()[0],
               info={**protos.to_state()[1], "images": f"first {n_proto} of {splits.train.name}"})

    fit_idx = correctly_classified(model, splits.val, n_fit, seed=seed)
    cal_idx = correctly_classified(model, splits.val, n_calibration, seed=seed, skip=n_fit)
    fit_images = splits.val.float_images(fit_idx)
    X, y, groups, per_attack, source = adversarial_training_set(
        model, protos, fit_images, splits.val.labels[fit_idx], attacks, digest=meta["files"]["model.safetensors"],
        cache_dir=cache_dir, seed=seed, progress=progress)
    X_cal = extract_path_features(model, protos, splits.val.float_images(cal_idx)).X
    extra: dict = {}
    if classifier == "ensemble":
        n_ref = min(n_reference, len(splits.train))
        X_ref = extract_path_features(model, protos, splits.train.float_images(torch.arange(n_ref))).X
        families = {a.label: a.family for a in attacks}
        validation = (X[y == 0], {f: X[np.isin(source, [a for a, g in families.items() if g == f])]
                                  for f in sorted(set(families.values()))})
        det = PathEnsembleDetector(target_fpr=target_fpr, random_state=seed).fit(
            X_ref, groups=groups, layer_sizes=protos.layer_sizes, X_calibration=X_cal, validation=validation)
        extra = {"reference_images": {"set": splits.train.name, "n": n_ref, "which": "first n"},
                 "weights": dict(zip(det.components, det.weights_.tolist()))}
    else:
        det = PathDetector(feature_groups=list(feature_groups), classifier=classifier, target_fpr=target_fpr,
                           random_state=seed).fit(X, y, groups=groups, X_calibration=X_cal)
    tensors, info = det.to_state()
    info.update(extra)
    info.update({
        "classifier": classifier, "feature_groups": list(feature_groups), "target_fpr": target_fpr,
        "attacks": [{"label": a.label, "name": a.name, "params": a.params} for a in attacks],
        "fit_images": {"set": splits.val.name, "n_clean": int(len(fit_idx)), "n_adversarial": int(y.sum()),
                       "seed": seed},
        "calibration_images": {"set": splits.val.name, "n": int(len(cal_idx)), "skip": n_fit, "seed": seed},
        "per_attack": per_attack, "fit_seconds": round(time.perf_counter() - t0, 1),
    })
    write_part(bundle_path, "detector", tensors=tensors, info=info)
    log.info("fitted %s detector on %d clean + %d adversarial images; threshold %.4f", classifier,
             int((y == 0).sum()), int(y.sum()), det.threshold_)
    return info
