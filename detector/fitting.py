"""``pathguard fit-detector``: compute class prototypes and fit the bundle's path detector.

``classifier="ensemble"`` (the default) ships :class:`~detector.detectors.PathEnsembleDetector`: its
clean-only components are fitted on the first ``n_reference`` clean *training* images, its supervised
component and kNN reference size on correctly classified *validation* images and their adversarial versions,
and its weights are fixed (``ensemble.SHIPPED_WEIGHTS``; ``--weights select`` chooses them there by worst
held-out family instead). A supervised classifier (``logreg``, ``rf``, ``gb``) instead learns from those validation
images directly.
Either way the validation split is held out of training and disjoint from the test set that ``evaluate``
reports on, and the threshold is calibrated on other clean validation images.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .attacks import AttackSpec, cached_attack, noisy_like, parse_attacks
from .bundle import BUNDLE_HELP, Bundle, load_bundle, write_part
from .detectors import PathDetector, PathEnsembleDetector
from .detectors.ensemble import (
    COMPONENTS,
    DEFAULT_COMPONENTS,
    KNN_REFERENCE_GRID,
    SHIPPED_PREFER,
    SHIPPED_WEIGHT_TOLERANCE,
    shipped_weights,
)
from .detectors.record import DetectorRecord
from .detectors.selection import PREFER, SELECT_BY
from .features import GROUPS, extract_path_features
from .models import DecoupledNet
from .prototypes import Prototypes, compute_prototypes
from .splits import Splits, bundle_splits, correctly_classified

log = logging.getLogger(__name__)

# Several budgets and norms of every family the evaluation's matrix has except the one algorithm (APGD) that is
# left to stand for a new attack of a seen family.
FIT_ATTACKS = "fgsm,pgd,pgd:eps=0.05,pgdl2,pgdl2:eps=0.75,cw,deepfool,square"


@dataclass
class TrainingRows:
    """Path-feature rows of clean validation images and their successful adversarial versions.

    X, y : the clean rows (one per image, in order) then the adversarial rows (y = 1).
    groups : the feature group of each column.
    per_attack : success rate and seconds per attack.
    source : attack label of each row of X ("" for clean rows).
    image : index of each row's clean image (clean row i is image i).
    noisy, noisy_source, noisy_image : noisy clean rows (the image plus Gaussian noise of the same L2 norm as
        its successful perturbation), the attack whose norm each copies, and the image (empty unless asked).
    """

    X: np.ndarray
    y: np.ndarray
    groups: list[str]
    per_attack: dict
    source: np.ndarray
    image: np.ndarray
    noisy: np.ndarray
    noisy_source: np.ndarray
    noisy_image: np.ndarray

    def validation(self, families: dict[str, str], extra: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        """The ensemble's :class:`~detector.detectors.selection.ValidationRows`, by attack family
        (``families``: attack label -> family); ``extra``: more families as {family: (rows, image indices)}."""
        from .detectors.selection import ValidationRows

        clean = self.X[self.y == 0]
        fam = np.array([families.get(a, "") for a in self.source])
        noisy_fam = np.array([families.get(a, "") for a in self.noisy_source])
        names = sorted({f for f in fam if f})
        adv = {f: self.X[fam == f] for f in names}
        adv_image = {f: self.image[fam == f] for f in names}
        noisy = {f: self.noisy[noisy_fam == f] for f in names if np.any(noisy_fam == f)}
        noisy_image = {f: self.noisy_image[noisy_fam == f] for f in noisy}
        for f, (rows, image) in (extra or {}).items():
            adv[f], adv_image[f] = rows, image
        return ValidationRows(clean, adv, adv_image, noisy, noisy_image)


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
    noisy: bool = False,
) -> TrainingRows:
    """Features of clean images plus their successful adversarial versions (and, with ``noisy``, of noisy
    clean copies whose noise has each successful perturbation's L2 norm: Ma et al.'s negatives)."""
    clean = extract_path_features(model, protos, clean_images)
    n = len(clean.X)
    blocks, ys, per_attack, source, image = [clean.X], [np.zeros(n)], {}, [""] * n, [np.arange(n)]
    noisy_blocks, noisy_source, noisy_image = [], [], []
    for spec in attacks:
        res = cached_attack(
            model, digest, clean_images, labels, spec, cache_dir=cache_dir, seed=seed, progress=progress
        )
        feats = extract_path_features(model, protos, res.adversarial)
        ok = (feats.logits.argmax(1) != labels).numpy()
        blocks.append(feats.X[ok])
        ys.append(np.ones(int(ok.sum())))
        source += [spec.label] * int(ok.sum())
        image.append(np.flatnonzero(ok))
        per_attack[spec.label] = {"success_rate": float(ok.mean()), "seconds": round(res.seconds, 1)}
        if noisy and ok.any():
            idx = torch.from_numpy(np.flatnonzero(ok))
            twins = noisy_like(clean_images[idx], res.adversarial[idx], seed)
            noisy_blocks.append(extract_path_features(model, protos, twins).X)
            noisy_source += [spec.label] * len(idx)
            noisy_image.append(idx.numpy())
    if sum(len(b) for b in ys[1:]) == 0:
        raise ValueError(
            f"no attack succeeded on the {n} fitting images ({per_attack}); give the attacks a larger budget"
        )
    width = clean.X.shape[1]
    return TrainingRows(
        np.concatenate(blocks),
        np.concatenate(ys),
        clean.groups,
        per_attack,
        np.asarray(source),
        np.concatenate(image),
        np.concatenate(noisy_blocks) if noisy_blocks else np.zeros((0, width)),
        np.asarray(noisy_source, dtype=str),
        np.concatenate(noisy_image) if noisy_image else np.zeros(0, dtype=np.int64),
    )


@dataclass
class FitConfig:
    """What ``pathguard fit-detector`` fits: which attacks, which classifier on which path features, on how
    many validation images, calibrated to which false-positive rate."""

    bundle: str = field(default="", metadata={"help": BUNDLE_HELP})
    attacks: str = field(
        default=FIT_ATTACKS,
        metadata={
            "help": "attacks on validation images (several budgets and norms): what the ensemble's supervised "
            "component learns from and its weights are chosen on (worst held-out family), or what a supervised "
            "classifier learns from"
        },
    )
    classifier: str = field(
        default="ensemble",
        metadata={
            "choices": ("ensemble", "logreg", "rf", "gb"),
            "help": (
                "ensemble: clean-only path scores and a supervised one combined with weights >= 0 (default); else "
                "one supervised classifier"
            ),
        },
    )
    features: str = field(default=",".join(GROUPS), metadata={"help": "feature groups (supervised classifiers)"})
    components: str = field(
        default=",".join(DEFAULT_COMPONENTS),
        metadata={"help": f"the ensemble's components, of {','.join(COMPONENTS)}"},
    )
    knn_reference_grid: str = field(
        default=",".join(str(s) for s in KNN_REFERENCE_GRID),
        metadata={"help": "candidate kNN reference paths per class, chosen on validation rows (one value: fixed)"},
    )
    weights: str = field(
        default="shipped",
        metadata={
            "help": "the ensemble's weights: shipped (summary 0.5, every other component 1), equal (every component "
            "1), select (chosen on validation by the worst held-out family), or one comma-separated weight >= 0 per "
            "component"
        },
    )
    select_by: str = field(
        default="auroc",
        metadata={
            "choices": SELECT_BY,
            "help": "what the ensemble's weights maximise over held-out families on validation: the worst AUROC, "
            "or the worst TPR at --target-fpr (then AUROC)",
        },
    )
    weight_tolerance: float = field(
        default=SHIPPED_WEIGHT_TOLERANCE,
        metadata={"help": "weight vectors whose worst held-out family is within this of the best count as tied"},
    )
    prefer: str = field(
        default=SHIPPED_PREFER,
        metadata={"choices": PREFER, "help": "among tied weight vectors: fewer or more non-zero weights"},
    )
    noisy_negatives: bool = field(
        default=True,
        metadata={
            "help": "no noisy clean validation images (noise of each perturbation's L2 norm) as extra negatives of "
            "the ensemble's supervised component",
            "flag": "--no-noisy-negatives",
            "switch": True,
        },
    )
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
        bad = set(self.component_names) - set(COMPONENTS)
        if bad or not self.component_names:
            raise ValueError(f"components={self.components!r} must name some of {list(COMPONENTS)}")
        try:
            sizes = self.reference_sizes
        except ValueError:
            sizes = [0]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"knn_reference_grid={self.knn_reference_grid!r} must be integers >= 1")
        try:
            fixed = self.fixed_weights
        except ValueError:
            fixed = (-1.0,)
        if fixed is not None and (len(fixed) != len(self.component_names) or min(fixed) < 0 or max(fixed) <= 0):
            raise ValueError(
                f"weights={self.weights!r} must be shipped, equal, select, or {len(self.component_names)} "
                "comma-separated weights >= 0, not all 0"
            )
        for name in ("n_fit", "n_calibration", "prototype_images", "n_reference"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def feature_groups(self) -> list[str]:
        return [g for g in self.features.split(",") if g]

    @property
    def component_names(self) -> list[str]:
        return [c for c in self.components.split(",") if c]

    @property
    def fixed_weights(self) -> tuple[float, ...] | None:
        """The ensemble's fixed weights, one per component, or None when they are chosen on validation."""
        if self.weights == "select":
            return None
        if self.weights == "equal":
            return (1.0,) * len(self.component_names)
        if self.weights == "shipped":
            return shipped_weights(self.component_names)
        return tuple(float(v) for v in self.weights.split(","))

    @property
    def reference_sizes(self) -> list[int]:
        return [int(v) for v in self.knn_reference_grid.split(",") if v.strip()]

    def ensemble(self) -> PathEnsembleDetector:
        """The ensemble this config fits (fixed weights, or chosen on validation; the kNN size chosen there)."""
        sizes = self.reference_sizes
        return PathEnsembleDetector(
            components=tuple(self.component_names),
            weights=self.fixed_weights,
            knn_reference=max(sizes),
            knn_reference_grid=tuple(sizes) if len(sizes) > 1 else None,
            select_by=self.select_by,
            weight_tolerance=self.weight_tolerance,
            prefer=self.prefer,
            target_fpr=self.target_fpr,
            random_state=self.seed,
        )


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
    rows: TrainingRows,
    X_cal: np.ndarray,
    images: tuple[torch.Tensor, torch.Tensor],
) -> tuple[PathDetector | PathEnsembleDetector, dict]:
    """The detector ``cfg.classifier`` names, calibrated on ``X_cal``, and what the bundle records of it beyond
    :class:`DetectorRecord`. A supervised one learns from the validation ``rows``; the ensemble fits its clean-only
    components on clean reference training images, and its supervised component, kNN reference size and weights
    on those rows by family (``images``: the fitting and calibration indices, for the record)."""
    if cfg.classifier != "ensemble":
        det = PathDetector(
            feature_groups=cfg.feature_groups,
            classifier=cfg.classifier,
            target_fpr=cfg.target_fpr,
            random_state=cfg.seed,
        ).fit(rows.X, rows.y, groups=rows.groups, X_calibration=X_cal)
        return det, {}
    n_ref = min(cfg.n_reference, len(splits.train))
    X_ref = extract_path_features(model, protos, splits.train.float_images(torch.arange(n_ref))).X
    det = cfg.ensemble().fit(
        X_ref,
        groups=rows.groups,
        layer_sizes=protos.layer_sizes,
        X_calibration=X_cal,
        validation=rows.validation({a.label: a.family for a in attacks}),
    )
    extra: dict = {
        "reference_images": {"set": splits.train.name, "n": n_ref, "which": "first n"},
        "weights": {c: w for c, w in zip(det.components, det.weights_.tolist()) if w > 0},
    }
    if det.selection_ is not None:
        fit_idx, cal_idx = images
        extra["selection"] = {
            **det.selection_,
            "images": f"chosen on validation images only, never on test images: {len(fit_idx)} correctly classified "
            f"{splits.val.name} images and their successful adversarial versions (the selection splits them into a "
            f"fitting and a scoring half by image); p-values and the threshold on {len(cal_idx)} other clean "
            f"{splits.val.name} images; clean-only components on the first {n_ref} {splits.train.name} images",
        }
    return det, extra


def validation_rows(
    cfg: FitConfig, bundle: Bundle, protos: Prototypes, splits: Splits, attacks: list[AttackSpec], progress: bool
) -> tuple[TrainingRows, np.ndarray, tuple[torch.Tensor, torch.Tensor]]:
    """What the detector is fitted and calibrated on, all of it validation images: the rows of ``cfg.n_fit``
    correctly classified ones and their successful adversarial versions (noisy copies too for the ensemble), the
    calibration rows of ``cfg.n_calibration`` others, and both sets' indices into ``splits.val``."""
    model, seed = bundle.model, cfg.seed
    fit_idx = correctly_classified(model, splits.val, cfg.n_fit, seed=seed)
    cal_idx = correctly_classified(model, splits.val, cfg.n_calibration, seed=seed, skip=cfg.n_fit)
    rows = adversarial_training_set(
        model,
        protos,
        splits.val.float_images(fit_idx),
        splits.val.labels[fit_idx],
        attacks,
        digest=bundle.model_digest,
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
        seed=seed,
        progress=progress,
        noisy=cfg.classifier == "ensemble" and cfg.noisy_negatives,
    )
    X_cal = extract_path_features(model, protos, splits.val.float_images(cal_idx)).X
    return rows, X_cal, (fit_idx, cal_idx)


def fit_bundle_detector(cfg: FitConfig, progress: bool = True) -> dict:
    """Fit prototypes and the detector of the bundle ``cfg.bundle`` and write them into it."""
    attacks, seed = parse_attacks(cfg.attacks), cfg.seed
    t0 = time.perf_counter()
    bundle = load_bundle(cfg.bundle)
    model = bundle.model
    splits = bundle_splits(bundle.meta, cfg.data_root)
    protos = _write_prototypes(cfg, model, splits)

    rows, X_cal, (fit_idx, cal_idx) = validation_rows(cfg, bundle, protos, splits, attacks, progress)
    det, extra = _fit_detector(cfg, model, protos, splits, attacks, rows, X_cal, (fit_idx, cal_idx))
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
                "n_adversarial": int(rows.y.sum()),
                "n_noisy": int(len(rows.noisy)),
                "seed": seed,
            },
            calibration_images={"set": splits.val.name, "n": int(len(cal_idx)), "skip": cfg.n_fit, "seed": seed},
            per_attack=rows.per_attack,
            fit_seconds=round(time.perf_counter() - t0, 1),
        ).to_info()
    )
    write_part(cfg.bundle, "detector", tensors=tensors, info=info)
    log.info(
        "fitted %s detector on %d clean + %d adversarial images; threshold %.4f",
        cfg.classifier,
        int((rows.y == 0).sum()),
        int(rows.y.sum()),
        det.threshold_,
    )
    return info
