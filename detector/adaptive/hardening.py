"""Hardening: refit the path detector with adaptive examples added to its training rows, then recalibrate.

The base rows are rebuilt from what ``detector.json`` records (validation-split fitting images, their
attacks and seeds, and the calibration images), so the hardened detector sees everything the shipped one
saw plus the adaptive examples. Adaptive examples come from validation images only, never from the test
images an evaluation reports on.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..attacks import AttackSpec
from ..bundle import Bundle, write_part
from ..detectors import FeatureDetector, PathDetector, PathEnsembleDetector
from ..detectors.record import DetectorRecord
from ..features import extract_path_features
from ..fitting import TrainingRows, adversarial_training_set
from ..prototypes import Prototypes
from ..splits import Splits, correctly_classified

log = logging.getLogger(__name__)


@dataclass
class DetectorTrainingSet:
    """Rows a path detector is fitted on (1 = adversarial), its clean calibration rows, and their images."""

    X: np.ndarray
    y: np.ndarray
    groups: list[str]
    X_calibration: np.ndarray
    fit_images: Tensor  # (n_fit, C, H, W): the clean validation images the adversarial rows come from
    fit_labels: Tensor
    X_reference: np.ndarray | None = None  # clean training rows of an ensemble's components
    family: np.ndarray | None = None  # attack family of each row of X ("" for clean rows)
    describe: dict = field(default_factory=dict)
    rows: TrainingRows | None = None  # the rows with their source images (what an ensemble's validation needs)


def _recorded_fitting(bundle: Bundle, splits: Splits) -> tuple[dict, dict, list[AttackSpec]]:
    """(fitting images, calibration images, attacks) as ``detector.json`` records them, checked to be usable."""
    record = bundle.detector_record()
    if record is None:
        raise ValueError(f"bundle {bundle.path} has no fitted detector; run `pathguard fit-detector` first")
    fit, cal, specs = record.fit_images, record.calibration_images, record.attacks
    if not fit or not cal or not specs:
        raise ValueError(
            f"bundle {bundle.path}: detector.json does not record its fitting images, calibration "
            "images and attacks, so its training rows cannot be rebuilt for hardening"
        )
    if fit["set"] != splits.val.name or cal["set"] != splits.val.name:
        raise ValueError(
            f"bundle {bundle.path}: the detector was fitted on {fit['set']!r}, not on the validation "
            f"split {splits.val.name!r}"
        )
    return fit, cal, specs


def base_training_set(
    bundle: Bundle, splits: Splits, prototypes: Prototypes, *, cache_dir: Path | None = None, progress: bool = False
) -> DetectorTrainingSet:
    """Rebuild the training and calibration rows of the bundle's fitted detector from ``detector.json``."""
    fit, cal, specs = _recorded_fitting(bundle, splits)
    model = bundle.model
    fit_idx = correctly_classified(model, splits.val, int(fit["n_clean"]), seed=int(fit["seed"]))
    cal_idx = correctly_classified(model, splits.val, int(cal["n"]), seed=int(cal["seed"]), skip=int(cal["skip"]))
    images, labels = splits.val.float_images(fit_idx), splits.val.labels[fit_idx]
    ensemble = bundle.part("detector")[1].get("estimator") == "PathEnsembleDetector"
    rows = adversarial_training_set(
        model,
        prototypes,
        images,
        labels,
        specs,
        digest=bundle.model_digest,
        cache_dir=cache_dir,
        seed=int(fit["seed"]),
        progress=progress,
        noisy=ensemble and int(fit.get("n_noisy", 0)) > 0,
    )
    X, y, groups, per_attack = rows.X, rows.y, rows.groups, rows.per_attack
    X_cal = extract_path_features(model, prototypes, splits.val.float_images(cal_idx)).X
    X_ref = None
    reference = bundle.part("detector")[1].get("reference_images")
    if reference:  # the ensemble's clean-only components: the first n training images
        n_ref = int(reference["n"])
        X_ref = extract_path_features(model, prototypes, splits.train.float_images(torch.arange(n_ref))).X
    families = {s.label: s.family for s in specs}
    return DetectorTrainingSet(
        X,
        y,
        groups,
        X_cal,
        images,
        labels,
        X_ref,
        np.asarray([families.get(a, "") for a in rows.source]),
        {
            "fit_images": {"set": splits.val.name, "n_clean": len(fit_idx), "seed": int(fit["seed"])},
            "calibration_images": {
                "set": splits.val.name,
                "n": len(cal_idx),
                "skip": int(cal["skip"]),
                "seed": int(cal["seed"]),
            },
            "attacks": [s.label for s in specs],
            "per_attack": per_attack,
            "n_rows": int(len(y)),
            "n_adversarial": int(y.sum()),
        },
        rows,
    )


def harden_detector(detector: FeatureDetector, base: DetectorTrainingSet, adaptive_rows: np.ndarray) -> FeatureDetector:
    """A new detector with ``detector``'s parameters, fitted on the base rows plus ``adaptive_rows`` (all labelled
    adversarial) and calibrated on the base calibration rows at the same target false-positive rate."""
    if adaptive_rows.ndim != 2 or adaptive_rows.shape[1] != base.X.shape[1]:
        raise ValueError(f"adaptive_rows must be (n, {base.X.shape[1]}), got {adaptive_rows.shape}")
    if isinstance(detector, PathEnsembleDetector):
        # clean-only components are refitted as they were; the adaptive examples join the supervised component's
        # rows and the weight selection as one more family (each assigned to a random validation image, so that
        # the selection's image halves split them too)
        if base.rows is None:
            raise ValueError("hardening an ensemble needs the base rows with their source images")
        families = {a: f for a, f in zip(base.rows.source, base.family) if a}
        image = np.random.default_rng(0).integers(int((base.y == 0).sum()), size=len(adaptive_rows))
        validation = base.rows.validation(families, {"adaptive": (adaptive_rows, image)})
        params = {**detector.get_params(), "weights": None}
        return PathEnsembleDetector(**params).fit(
            base.X_reference,
            groups=base.groups,
            layer_sizes=[int(s) for s in detector.components_[0].layer_sizes_],
            X_calibration=base.X_calibration,
            validation=validation,
        )
    X = np.concatenate([base.X, adaptive_rows])
    y = np.concatenate([base.y, np.ones(len(adaptive_rows))])
    return PathDetector(**detector.get_params()).fit(X, y, groups=base.groups, X_calibration=base.X_calibration)


def save_hardened(bundle: Bundle, detector: FeatureDetector, out: Path, info: dict) -> Path:
    """Copy the bundle to ``out`` (which must not exist) and replace the copy's detector with ``detector``."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"--save-hardened {out} already exists; give a new directory")
    shutil.copytree(bundle.path, out)
    tensors, state = detector.to_state()
    record = bundle.detector_record() or DetectorRecord()
    record.fit_seconds, record.hardened = None, info
    kept = {k: v for k, v in (bundle.part("detector") or ({}, {}))[1].items() if k == "reference_images"}
    write_part(out, "detector", tensors=tensors, info={**state, **record.to_info(), **kept})
    log.info("wrote the hardened detector into a copy of the bundle at %s", out)
    return out


def rows_of(images: Tensor, model, prototypes: Prototypes, labels: Tensor) -> np.ndarray:
    """Feature rows of the misclassified images among ``images`` (the adversarial examples that worked)."""
    feats = extract_path_features(model, prototypes, images)
    wrong = (feats.logits.argmax(1) != labels).numpy()
    return feats.X[wrong]


def as_device(prototypes: Prototypes, device: torch.device) -> Prototypes:
    return Prototypes(
        prototypes.frequency.to(device),
        prototypes.soft_mean.to(device),
        prototypes.counts,
        prototypes.layer_sizes,
        prototypes.layer_names,
        prototypes.input_size,
    )
