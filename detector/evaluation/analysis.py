"""From adversarial images to detection results: featurize, fit, calibrate, score, compare."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..attacks import AttackSpec
from ..bundle import Bundle
from ..detectors import FEATURIZERS, FeatureDetector, FeaturizerContext, PathDetector, get_detector
from ..features import GROUPS
from .config import EvalConfig
from .images import ImageSets
from .metrics import detection_metrics

log = logging.getLogger(__name__)


class NoAdversarialExamples(ValueError):
    """No successful adversarial example to fit a detector on."""


@dataclass
class FeatureSets:
    """One featurizer's features of every image set."""

    calibration: np.ndarray
    fit_clean: np.ndarray
    eval_clean: np.ndarray
    fit_adv: dict[str, np.ndarray]
    eval_adv: dict[str, np.ndarray]
    groups: list[str]
    seconds_per_image: float  # featurizing cost, measured on the evaluation images


@dataclass
class AttackOutcome:
    fit_success: np.ndarray  # (n_fit,) bool
    eval_success: np.ndarray  # (n,) bool
    stats: dict


@torch.no_grad()
def _predict(model, images: Tensor, batch: int = 500) -> Tensor:
    return torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])


def attack_outcomes(model, sets: ImageSets, adv: dict[str, Tensor],
                    specs: list[AttackSpec]) -> dict[str, AttackOutcome]:
    n_fit = len(sets.fit.indices)
    clean, labels = sets.attack_images
    out = {}
    for spec in specs:
        a = adv[spec.label]
        success = (_predict(model, a) != labels).numpy()
        d = (a - clean).flatten(1)
        l2, linf = d.norm(dim=1).numpy(), d.abs().amax(dim=1).numpy()
        ev = slice(n_fit, None)
        s_ev = success[ev]
        out[spec.label] = AttackOutcome(success[:n_fit], s_ev, {
            "name": spec.name, "params": spec.params, "norm": spec.norm, "budget": spec.budget,
            "n": int(len(s_ev)), "n_successful": int(s_ev.sum()), "success_rate": float(s_ev.mean()),
            "fit_success_rate": float(success[:n_fit].mean()),
            "mean_l2": float(l2[ev].mean()), "mean_linf": float(linf[ev].mean()),
            "mean_l2_successful": float(l2[ev][s_ev].mean()) if s_ev.any() else None,
            "mean_linf_successful": float(linf[ev][s_ev].mean()) if s_ev.any() else None,
            "max_linf": float(linf.max()), "max_l2": float(l2.max()),
        })
    return out


def featurize(featurizer, sets: ImageSets, adv: dict[str, Tensor]) -> FeatureSets:
    n_fit = len(sets.fit.indices)
    t0 = time.perf_counter()
    eval_clean = featurizer.transform(sets.eval.images)
    per_image = (time.perf_counter() - t0) / len(sets.eval.images)
    fit_adv, eval_adv = {}, {}
    for label, a in adv.items():
        fit_adv[label] = featurizer.transform(a[:n_fit])
        eval_adv[label] = featurizer.transform(a[n_fit:])
    return FeatureSets(featurizer.transform(sets.calibration.images), featurizer.transform(sets.fit.images),
                       eval_clean, fit_adv, eval_adv, list(featurizer.groups), per_image)


def concat_feature_sets(parts: list[FeatureSets]) -> FeatureSets:
    """The features of ``ConcatFeaturizer(parts)`` from the parts' own, without featurizing again."""
    def cat(blocks):
        return np.concatenate(blocks, axis=1)

    first = parts[0]
    return FeatureSets(cat([p.calibration for p in parts]), cat([p.fit_clean for p in parts]),
                       cat([p.eval_clean for p in parts]),
                       {k: cat([p.fit_adv[k] for p in parts]) for k in first.fit_adv},
                       {k: cat([p.eval_adv[k] for p in parts]) for k in first.eval_adv},
                       [g for p in parts for g in p.groups], sum(p.seconds_per_image for p in parts))


def fit_detector(est: FeatureDetector, feats: FeatureSets, outcomes: dict[str, AttackOutcome],
                 attacks: list[str]) -> FeatureDetector:
    """Fit on clean fitting images plus the *successful* adversarial versions from ``attacks``."""
    blocks = [feats.fit_clean] + [feats.fit_adv[a][outcomes[a].fit_success] for a in attacks]
    X = np.concatenate(blocks)
    y = np.r_[np.zeros(len(feats.fit_clean)), np.ones(len(X) - len(feats.fit_clean))]
    if y.sum() == 0:
        raise NoAdversarialExamples(f"none of the attacks {attacks} succeeded on the fitting images")
    return est.fit(X, y, groups=feats.groups, X_calibration=feats.calibration)


def score(est: FeatureDetector, feats: FeatureSets, outcomes: dict[str, AttackOutcome]) -> tuple[dict, dict]:
    """Per attack: metrics on successful attacks (with an ``all`` sub-dict for every attacked image),
    and the scores themselves (for plots)."""
    clean = est.decision_function(feats.eval_clean)
    results, scores = {}, {"clean": clean}
    for label, X in feats.eval_adv.items():
        s = est.decision_function(X)
        ok = outcomes[label].eval_success
        results[label] = {**detection_metrics(clean, s[ok], est.threshold_),
                          "all": detection_metrics(clean, s, est.threshold_)}
        scores[label] = s[ok]
    return results, scores


@torch.no_grad()
def forward_seconds_per_image(model, images: Tensor, batch: int = 500) -> float:
    model(images[:batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        model(images[i:i + batch])
    return (time.perf_counter() - t0) / len(images)


# Over 60 lines on purpose: featurize once per featurizer, then fit/score every detector; the two loops
# share the feature cache and timings, and the per-detector work is already in helpers.
def analyze(cfg: EvalConfig, bundle: Bundle, sets: ImageSets, specs: list[AttackSpec],
            adv: dict[str, Tensor]) -> tuple[dict, dict]:
    """Fit and score every detector of ``cfg``; returns (report sections, scores for plots)."""
    model = bundle.model.eval()
    attacks = [s.label for s in specs]
    outcomes = attack_outcomes(model, sets, adv, specs)
    protos = bundle.prototypes()
    ctx = FeaturizerContext(model, protos, sets.reference.images, sets.reference.labels, cfg.seed)
    forward_s = forward_seconds_per_image(model, sets.eval.images)

    needed = {("path" if name == "bundle" else get_detector(name).featurizer) for name in cfg.detectors}
    features: dict[str, FeatureSets] = {}
    featurizer_fit_s: dict[str, float] = {}
    # Featurizer "a+b" is the concatenation of "a" and "b" (registry convention): built from theirs when both
    # are computed anyway (the Mahalanobis part alone costs minutes on 1000s of images).
    for key in sorted(needed, key=lambda k: ("+" in k, k)):
        parts = key.split("+")
        if len(parts) > 1 and all(p in features for p in parts):
            features[key] = concat_feature_sets([features[p] for p in parts])
            featurizer_fit_s[key] = sum(featurizer_fit_s[p] for p in parts)
            log.info("features of %s: those of %s side by side", key, ", ".join(parts))
            continue
        t0 = time.perf_counter()
        fz = FEATURIZERS[key](ctx).fit(sets.reference.images, sets.reference.labels)
        featurizer_fit_s[key] = time.perf_counter() - t0
        log.info("featurizing with %s", key)
        features[key] = featurize(fz, sets, adv)

    results, plot_scores, detectors, loo, timing = {}, {}, {}, {}, {}
    for name in cfg.detectors:
        if name == "bundle":
            est, record = bundle.detector(), bundle.detector_record()
            if est is None or record is None:
                raise ValueError(f"detector 'bundle' asked for, but {bundle.path} has no fitted detector")
            feats, fit_s = features["path"], 0.0
            entry_desc = f"the bundle's own detector ({record.classifier}, fitted by fit-detector)"
            fkey = "path"
        else:
            entry = get_detector(name)
            feats, fkey, entry_desc = features[entry.featurizer], entry.featurizer, entry.description
            t0 = time.perf_counter()
            est = fit_detector(entry.make(cfg.target_fpr, cfg.seed), feats, outcomes, attacks)
            fit_s = time.perf_counter() - t0 + featurizer_fit_s[fkey]
        t0 = time.perf_counter()
        results[name], plot_scores[name] = score(est, feats, outcomes)
        decide_s = (time.perf_counter() - t0) / (len(feats.eval_clean) * (1 + len(attacks)))
        detectors[name] = {"description": entry_desc, "featurizer": fkey, "threshold": float(est.threshold_),
                           "n_features": int(est.n_features_in_)}
        timing[name] = {"fit_seconds": round(fit_s, 2),
                        "score_cost_ratio": (feats.seconds_per_image + decide_s) / forward_s}
        if cfg.leave_one_out and len(attacks) > 1 and name != "bundle":
            loo[name] = {}
            for held in attacks:
                try:
                    est_h = fit_detector(get_detector(name).make(cfg.target_fpr, cfg.seed), feats, outcomes,
                                         [a for a in attacks if a != held])
                except NoAdversarialExamples as exc:
                    loo[name][held] = {"auroc": None, "tpr_at_fpr": None, "note": str(exc)}
                    continue
                clean = est_h.decision_function(feats.eval_clean)
                s = est_h.decision_function(feats.eval_adv[held])[outcomes[held].eval_success]
                m = detection_metrics(clean, s, est_h.threshold_)
                loo[name][held] = {"auroc": m["auroc"], "tpr_at_fpr": m["tpr_at_fpr"]}

    ablation = {}
    if cfg.ablation and "path" in features:
        feats = features["path"]
        variants = {f"only:{g}": [g] for g in GROUPS} | {f"without:{g}": [h for h in GROUPS if h != g] for g in GROUPS}
        for vname, groups in variants.items():
            est = fit_detector(PathDetector(feature_groups=groups, target_fpr=cfg.target_fpr, random_state=cfg.seed),
                               feats, outcomes, attacks)
            res, _ = score(est, feats, outcomes)
            ablation[vname] = {a: {"auroc": r["auroc"], "tpr_at_fpr": r["tpr_at_fpr"]} for a, r in res.items()}

    report = {
        "attacks": {label: o.stats for label, o in outcomes.items()},
        "results": results,
        "detectors": detectors,
        "leave_one_attack_out": loo,
        "ablation": ablation,
        "timing": {"forward_seconds_per_image": forward_s, "detectors": timing},
    }
    return report, plot_scores
