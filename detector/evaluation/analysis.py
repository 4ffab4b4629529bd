"""From adversarial images to detection results: featurize, fit, calibrate, score, compare."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from ..attacks import AttackSpec, noisy_like
from ..bundle import Bundle
from ..detectors import FEATURIZERS, FeatureDetector, FeaturizerContext, PathDetector, get_detector
from ..detectors.selection import selection_metric
from ..features import GROUPS, INPUT
from ..prototypes import Prototypes
from .config import EvalConfig
from .design import FitRecord, NoAdversarialExamples, family_of, fit_estimator, holdout_plans
from .images import ImageSets
from .metrics import detection_metrics

log = logging.getLogger(__name__)


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
    reference: np.ndarray | None = None  # clean reference (training) images, for clean-only detectors
    fit_noisy: dict[str, np.ndarray] = field(default_factory=dict)  # noisy fitting images, per attack
    names: list[str] = field(default_factory=list)
    forward_seconds_per_image: float = 0.0  # the plain forward pass, timed beside the featurizing (0: not measured)


@dataclass
class AttackOutcome:
    fit_success: np.ndarray  # (n_fit,) bool
    eval_success: np.ndarray  # (n,) bool
    stats: dict


@torch.no_grad()
def _predict(model, images: Tensor, batch: int = 500) -> Tensor:
    return torch.cat([model(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])


def attack_outcomes(
    model, sets: ImageSets, adv: dict[str, Tensor], specs: list[AttackSpec]
) -> dict[str, AttackOutcome]:
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
        out[spec.label] = AttackOutcome(
            success[:n_fit],
            s_ev,
            {
                "name": spec.name,
                "params": spec.params,
                "norm": spec.norm,
                "budget": spec.budget,
                "n": int(len(s_ev)),
                "n_successful": int(s_ev.sum()),
                "success_rate": float(s_ev.mean()),
                "fit_success_rate": float(success[:n_fit].mean()),
                "mean_l2": float(l2[ev].mean()),
                "mean_linf": float(linf[ev].mean()),
                "mean_l2_successful": float(l2[ev][s_ev].mean()) if s_ev.any() else None,
                "mean_linf_successful": float(linf[ev][s_ev].mean()) if s_ev.any() else None,
                "max_linf": float(linf.max()),
                "max_l2": float(l2.max()),
            },
        )
    return out


def featurize(
    featurizer,
    sets: ImageSets,
    adv: dict[str, Tensor],
    *,
    reference: bool = False,
    noisy: bool = False,
    seed: int = 0,
    model=None,
    scoring=None,
) -> FeatureSets:
    """Features of every image set; ``reference`` adds the reference images (for clean-only detectors),
    ``noisy`` the noisy twins of the fitting images per attack (:func:`design.noisy_like`); with ``model``, the
    featurizing cost is timed beside its plain forward pass (:func:`paired_cost`). ``scoring``: optional
    callable, given the fitting rows' features (fit_clean, fit_adv, fit_noisy), returning the featurizer for the
    rows that are only scored (calibration, evaluation), e.g. one computing only the columns the fits read."""
    n_fit = len(sets.fit.indices)
    fit_clean, fit_adv, fit_noisy, scorer = None, None, None, featurizer
    if scoring is not None:  # the fitting rows first, to know what the scored rows need
        fit_clean = featurizer.transform(sets.fit.images)
        fit_adv = {label: featurizer.transform(a[:n_fit]) for label, a in adv.items()}
        fit_noisy = {
            label: featurizer.transform(noisy_like(sets.fit.images, a[:n_fit], seed))
            for label, a in (adv.items() if noisy else ())
        }
        scorer = scoring(fit_clean, fit_adv, fit_noisy)
    t0 = time.perf_counter()
    eval_clean = scorer.transform(sets.eval.images)
    cold = time.perf_counter() - t0
    late_adv, late_noisy, eval_adv = {}, {}, {}
    for label, a in adv.items():  # in this order: a featurizer may draw randomness as it goes
        if fit_adv is None:
            late_adv[label] = featurizer.transform(a[:n_fit])
        eval_adv[label] = scorer.transform(a[n_fit:])
        if noisy and fit_noisy is None:
            late_noisy[label] = featurizer.transform(noisy_like(sets.fit.images, a[:n_fit], seed))
    per_image, forward_per_image = paired_cost(scorer, model, sets.eval.images, cold)
    return FeatureSets(
        scorer.transform(sets.calibration.images),
        featurizer.transform(sets.fit.images) if fit_clean is None else fit_clean,
        eval_clean,
        late_adv if fit_adv is None else fit_adv,
        eval_adv,
        list(featurizer.groups),
        per_image,
        featurizer.transform(sets.reference.images) if reference else None,
        late_noisy if fit_noisy is None else fit_noisy,
        list(getattr(featurizer, "names", []) or featurizer.groups),
        forward_seconds_per_image=forward_per_image,
    )


def paired_cost(featurizer, model, images: Tensor, cold: float, cheap: float = 5.0) -> tuple[float, float]:
    """(featurizing, plain forward pass) seconds per image of ``images``, warm and timed side by side, so that
    the machine's load drifts alike for both: of three (forward, featurize) rounds, the round with the median
    ratio (one round when a pass costs over ``cheap`` seconds; the cold pass ``cold`` counts if it was faster).
    Without a model, (cold / n, 0)."""
    n = len(images)
    if model is None or n == 0:
        return cold / max(n, 1), 0.0
    forward_seconds_per_image(model, images, repeats=1)  # warm-up (its timing is not used)
    rounds = []
    for _ in range(3 if cold < cheap else 1):
        f = forward_seconds_per_image(model, images, repeats=1, warm_up=False)
        t0 = time.perf_counter()
        featurizer.transform(images)
        rounds.append((min(cold, time.perf_counter() - t0) / n, f))
    rounds.sort(key=lambda r: r[0] / r[1])
    return rounds[len(rounds) // 2]


def concat_feature_sets(parts: list[FeatureSets]) -> FeatureSets:
    """The features of ``ConcatFeaturizer(parts)`` from the parts' own, without featurizing again."""

    def cat(blocks):
        return np.concatenate(blocks, axis=1)

    first = parts[0]
    return FeatureSets(
        cat([p.calibration for p in parts]),
        cat([p.fit_clean for p in parts]),
        cat([p.eval_clean for p in parts]),
        {k: cat([p.fit_adv[k] for p in parts]) for k in first.fit_adv},
        {k: cat([p.eval_adv[k] for p in parts]) for k in first.eval_adv},
        [g for p in parts for g in p.groups],
        sum(p.seconds_per_image for p in parts),
        forward_seconds_per_image=sum(p.forward_seconds_per_image for p in parts) / len(parts),
        names=[n for p in parts for n in p.names],
    )


def evaluation_prototypes(bundle: Bundle) -> Prototypes | None:
    """The bundle's prototypes, asked to carry the input image (the ``input`` group) when they do not.

    Bundles fitted before the input-consistency score (``input_size`` 0) still get every detector the run asks
    for: the group is placed last, so the columns before it are the bundle's own layout, which
    :func:`shipped_columns` gives back to its shipped detector.
    """
    protos = bundle.prototypes()
    if protos is None or protos.input_size:
        return protos
    return replace(protos, input_size=math.prod(bundle.input_shape))


def shipped_columns(feats: FeatureSets, bundle: Bundle) -> FeatureSets:
    """``feats`` without the ``input`` group when the bundle's own prototypes do not carry it (its detector was
    fitted without those columns); else ``feats`` unchanged."""
    protos = bundle.prototypes()
    if protos is None or protos.input_size or INPUT not in feats.groups:
        return feats
    keep = np.array([g != INPUT for g in feats.groups])

    def cols(a):
        return a[:, keep]

    return replace(
        feats,
        calibration=cols(feats.calibration),
        fit_clean=cols(feats.fit_clean),
        eval_clean=cols(feats.eval_clean),
        fit_adv={k: cols(v) for k, v in feats.fit_adv.items()},
        eval_adv={k: cols(v) for k, v in feats.eval_adv.items()},
        groups=[g for g in feats.groups if g != INPUT],
        reference=None if feats.reference is None else cols(feats.reference),
        fit_noisy={k: cols(v) for k, v in feats.fit_noisy.items()},
        names=[n for n, g in zip(feats.names, feats.groups) if g != INPUT] if feats.names else [],
    )


def score(
    est: FeatureDetector, feats: FeatureSets, outcomes: dict[str, AttackOutcome], seen: set[str] | None = None
) -> tuple[dict, dict]:
    """Per attack: metrics on successful attacks (with an ``all`` sub-dict for every attacked image, and
    ``seen``: whether the attack's examples were in the fit), and the scores themselves (for plots)."""
    clean = est.decision_function(feats.eval_clean)
    results, scores = {}, {"clean": clean}
    for label, X in feats.eval_adv.items():
        s = est.decision_function(X)
        ok = outcomes[label].eval_success
        results[label] = {
            **detection_metrics(clean, s[ok], est.threshold_),
            "all": detection_metrics(clean, s, est.threshold_),
            "seen": label in (seen or set()),
        }
        scores[label] = s[ok]
    return results, scores


@torch.no_grad()
def forward_seconds_per_image(model, images: Tensor, batch: int = 500, repeats: int = 2, warm_up: bool = True) -> float:
    """Seconds per image of the plain forward pass (logits only): after a warm-up, the best of ``repeats``."""
    if warm_up:
        model(images[:batch])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            model(images[i : i + batch])
        best = min(best, time.perf_counter() - t0)
    return best / len(images)


def _heldout(
    est_factory,
    feats,
    outcomes,
    plans: dict[str, list[str]],
    fit_kw: dict,
    held_attacks: dict[str, list[str]],
    reuse=None,
    fits: dict | None = None,
) -> dict:
    """AUROC / TPR on each held-out key's attacks, the detector refitted on ``plans[key]`` only. ``fits``: fits
    already made by attack set (leaving out an attack alone in its family is leaving out the family: one fit)."""
    out = {}
    fits = {} if fits is None else fits
    for key, fitted_on in plans.items():
        try:
            which = frozenset(fitted_on)
            if which not in fits:
                fits[which] = fit_estimator(est_factory(), feats, outcomes, fitted_on, reuse=reuse, **fit_kw)
            est, record = fits[which]
        except NoAdversarialExamples as exc:
            out[key] = {a: {"auroc": None, "tpr_at_fpr": None, "note": str(exc)} for a in held_attacks[key]}
            continue
        leaked = record.seen & set(held_attacks[key])
        if leaked:  # cannot happen by construction; the tests check the records too
            raise RuntimeError(f"held-out attacks {sorted(leaked)} reached the fit for {key!r}")
        clean = est.decision_function(feats.eval_clean)
        per = {}
        for a in held_attacks[key]:
            s = est.decision_function(feats.eval_adv[a])[outcomes[a].eval_success]
            m = detection_metrics(clean, s, est.threshold_)
            per[a] = {"auroc": m["auroc"], "tpr_at_fpr": m["tpr_at_fpr"], "fitted_on": sorted(record.seen)}
        out[key] = per
    return out


# Over 60 lines on purpose: featurize once per featurizer, then fit/score every detector; the two loops
# share the feature cache and timings, and the per-detector work is already in helpers.
def analyze(
    cfg: EvalConfig, bundle: Bundle, sets: ImageSets, specs: list[AttackSpec], adv: dict[str, Tensor]
) -> tuple[dict, dict]:
    """Fit and score every detector of ``cfg``; returns (report sections, scores for plots)."""
    model = bundle.model.eval()
    attacks = [s.label for s in specs]
    outcomes = attack_outcomes(model, sets, adv, specs)
    protos = evaluation_prototypes(bundle)
    ctx = FeaturizerContext(model, protos, sets.reference.images, sets.reference.labels, cfg.seed)
    forward_s = forward_seconds_per_image(model, sets.eval.images)
    families = family_of(specs)
    plans = holdout_plans(specs)

    entries = {name: get_detector(name) for name in cfg.detectors if name != "bundle"}
    needed = {e.featurizer for e in entries.values()} | ({"path"} if "bundle" in cfg.detectors else set())
    clean_feats = {e.featurizer for e in entries.values() if _uses_reference(e.make(cfg.target_fpr, cfg.seed))}
    noisy_feats = {e.featurizer for e in entries.values() if e.noisy_negatives}
    features: dict[str, FeatureSets] = {}
    stages: dict[str, float] = {}  # wall seconds of each step, for the report's timing
    featurizer_fit_s: dict[str, float] = {}
    layer_sizes = list(protos.layer_sizes) if protos is not None else list(model.gate_sizes)
    fit_kw = {
        "families": families,
        "layer_sizes": layer_sizes,
        "clean_set": sets.fit.name,
        "reference_set": sets.reference.name,
    }
    # Featurizer "a+b" is the concatenation of "a" and "b" (registry convention): built from theirs when both
    # are computed anyway (the Mahalanobis part alone costs minutes on 1000s of images).
    for key in sorted(needed, key=lambda k: ("+" in k, k)):
        parts = key.split("+")
        if len(parts) > 1 and all(p in features for p in parts) and key not in clean_feats | noisy_feats:
            features[key] = concat_feature_sets([features[p] for p in parts])
            featurizer_fit_s[key] = sum(featurizer_fit_s[p] for p in parts)
            log.info("features of %s: those of %s side by side", key, ", ".join(parts))
            continue
        t0 = time.perf_counter()
        fz = FEATURIZERS[key](ctx).fit(sets.reference.images, sets.reference.labels)
        featurizer_fit_s[key] = time.perf_counter() - t0
        log.info("featurizing with %s", key)
        consumers = [e for e in entries.values() if e.featurizer == key]
        shared = any(key in k.split("+") for k in needed if "+" in k)
        scoring = None if shared else _chosen_magnitudes(fz, consumers, cfg, outcomes, plans, fit_kw)
        features[key] = featurize(
            fz,
            sets,
            adv,
            reference=key in clean_feats,
            noisy=key in noisy_feats,
            seed=cfg.seed,
            model=model,
            scoring=scoring,
        )
        stages[f"featurize {key}"] = time.perf_counter() - t0

    results, plot_scores, detectors, loo, lofo, timing = {}, {}, {}, {}, {}, {}
    caches: dict[str, dict] = {}  # per detector: supervised parts fitted on identical rows, reused by held-out fits
    for name in cfg.detectors:
        if name == "bundle":
            est, record = bundle.detector(), bundle.detector_record()
            if est is None or record is None:
                raise ValueError(f"detector 'bundle' asked for, but {bundle.path} has no fitted detector")
            feats, fit_s, fkey = shipped_columns(features["path"], bundle), 0.0, "path"
            info = bundle.part("detector")[1]
            fitting = {"kind": "as shipped", "text": _shipped_fitting(info)}
            entry_desc = f"the bundle's own detector ({info.get('estimator')}, as fitted by fit-detector; not refitted)"
            seen = {a for a in attacks if families[a] in _shipped_families(info)}
        else:
            entry = entries[name]
            feats, fkey, entry_desc = _features_for(entry, features), entry.featurizer, entry.description
            t0 = time.perf_counter()
            est, record = fit_estimator(
                entry.make(cfg.target_fpr, cfg.seed),
                feats,
                outcomes,
                attacks,
                cache=caches.setdefault(name, {}),
                **fit_kw,
            )
            fit_s = time.perf_counter() - t0 + featurizer_fit_s[fkey]
            fitting, seen = record.to_dict(), _seen(est, record, families, attacks)
        t0 = time.perf_counter()
        results[name], plot_scores[name] = score(est, feats, outcomes, seen)
        decide_s = (time.perf_counter() - t0) / (len(feats.eval_clean) * (1 + len(attacks)))
        detectors[name] = {
            "description": entry_desc,
            "featurizer": fkey,
            "threshold": float(est.threshold_),
            "n_features": int(est.n_features_in_),
            "fitting": fitting,
            "clean_only": bool(getattr(est, "clean_only", False)),
            **_choices(est),
        }
        timing[name] = {
            "fit_seconds": round(fit_s, 2),
            "score_cost_ratio": (feats.seconds_per_image + decide_s) / (feats.forward_seconds_per_image or forward_s),
        }
        stages[f"fit and score {name}"] = fit_s + (time.perf_counter() - t0) - featurizer_fit_s.get(fkey, 0.0)
        if name != "bundle" and not getattr(est, "clean_only", False) and len(attacks) > 1:
            t0 = time.perf_counter()
            _holdout_tables(
                cfg,
                entries[name],
                est,
                feats,
                outcomes,
                plans,
                {**fit_kw, "cache": caches[name]},
                families,
                loo,
                lofo,
                name,
            )
            stages[f"held-out fits {name}"] = time.perf_counter() - t0

    ablation = {}
    t0 = time.perf_counter()
    if cfg.ablation and "path" in features:
        feats = replace(features["path"], fit_noisy={})  # the ablation's logistic regressions: no noisy negatives
        variants = {f"only:{g}": [g] for g in GROUPS} | {f"without:{g}": [h for h in GROUPS if h != g] for g in GROUPS}
        for vname, groups in variants.items():
            est, _ = fit_estimator(
                PathDetector(feature_groups=groups, target_fpr=cfg.target_fpr, random_state=cfg.seed),
                feats,
                outcomes,
                attacks,
                **fit_kw,
            )
            res, _ = score(est, feats, outcomes)
            ablation[vname] = {a: {"auroc": r["auroc"], "tpr_at_fpr": r["tpr_at_fpr"]} for a, r in res.items()}

    stages["ablation"] = time.perf_counter() - t0
    report = {
        "attacks": {label: o.stats | {"family": families[label]} for label, o in outcomes.items()},
        "results": results,
        "detectors": detectors,
        "leave_one_attack_out": loo,
        "leave_one_family_out": lofo,
        "unseen_summary": unseen_summary(results, lofo, detectors, families),
        "ablation": ablation,
        "timing": {"forward_seconds_per_image": forward_s, "detectors": timing, "stages": stages},
    }
    return report, plot_scores


class _Magnitudes:
    """A Mahalanobis featurizer that computes only the noise magnitudes ``noise`` (the other columns NaN)."""

    def __init__(self, featurizer, noise: list[float]) -> None:
        self.featurizer, self.noise = featurizer, noise

    @property
    def groups(self) -> list[str]:
        return self.featurizer.groups

    def transform(self, images: Tensor) -> np.ndarray:
        return self.featurizer.transform(images, noise=self.noise)


def _chosen_magnitudes(featurizer, consumers, cfg: EvalConfig, outcomes, plans, fit_kw):
    """For a Mahalanobis featurizer whose every consumer is a :class:`MahalanobisDetector`: a ``scoring``
    callback for :func:`featurize` that chooses each fit's noise magnitude on the fitting rows (the main fit and
    every held-out fit, as they will choose it: on the same rows by the same rule) and featurizes the rows that
    are only scored (calibration, evaluation) at those magnitudes alone; None otherwise."""
    from ..detectors.mahalanobis import MahalanobisDetector, MahalanobisFeaturizer

    made = [e.make(cfg.target_fpr, cfg.seed) for e in consumers]
    if not isinstance(featurizer, MahalanobisFeaturizer) or not made:
        return None
    if not all(isinstance(est, MahalanobisDetector) for est in made):
        return None
    fitted_on = [list(fit_kw["families"])]
    fitted_on += list(plans["attack"].values()) if cfg.leave_one_out else []
    fitted_on += list(plans["family"].values()) if cfg.leave_one_family_out else []

    def scoring(fit_clean, fit_adv, fit_noisy):
        # the fitting rows stand in for the calibration rows: these fits are kept for their choice only
        part = FeatureSets(fit_clean, fit_clean, fit_clean[:0], fit_adv, {}, list(featurizer.groups), 0.0)
        chosen = set()
        for entry in consumers:
            feats = replace(part, fit_noisy=fit_noisy if entry.noisy_negatives else {})
            for attacks in fitted_on:
                try:
                    est, _ = fit_estimator(entry.make(cfg.target_fpr, cfg.seed), feats, outcomes, attacks, **fit_kw)
                except NoAdversarialExamples:
                    continue
                chosen.add(float(est.noise_))
        log.info("Mahalanobis magnitudes the fits choose: %s; scored rows get only those", sorted(chosen))
        return _Magnitudes(featurizer, sorted(chosen))

    return scoring


def _features_for(entry, features: dict[str, FeatureSets]) -> FeatureSets:
    """The entry's featurizer's features; the noisy fitting rows only for entries that fit with them (another
    entry of the same featurizer may have asked for them)."""
    feats = features[entry.featurizer]
    return feats if entry.noisy_negatives else replace(feats, fit_noisy={})


def _holdout_tables(
    cfg: EvalConfig, entry, est, feats, outcomes, plans, fit_kw, families, loo, lofo, name: str
) -> None:
    """Fill ``loo[name]`` (leave one attack out) and ``lofo[name]`` (leave one family out) as ``cfg`` asks."""
    attacks = list(families)

    def make():
        return entry.make(cfg.target_fpr, cfg.seed)

    reuse = est if hasattr(est, "components") else None
    fits: dict = {}  # shared by both tables
    if cfg.leave_one_out:
        loo[name] = {
            a: per[a]
            for a, per in _heldout(
                make, feats, outcomes, plans["attack"], fit_kw, {a: [a] for a in attacks}, reuse, fits
            ).items()
        }
    if cfg.leave_one_family_out:
        held = {f: [a for a in attacks if families[a] == f] for f in plans["family"]}
        lofo[name] = _heldout(make, feats, outcomes, plans["family"], fit_kw, held, reuse, fits)


def _choices(est) -> dict:
    """What a detector chose on the fitting images: the ensemble's weights, the squeezers picked."""
    out: dict = {}
    if getattr(est, "selection_", None):
        out["selection"] = dict(est.selection_)
        out["weights"] = dict(zip(est.components, est.weights_.tolist()))
    if hasattr(est, "selected_"):
        out["squeezers"] = list(est.selected_)
        out["selection_auroc_on_fitting_rows"] = est.selection_auroc_
    return out


def _uses_reference(est) -> bool:
    return getattr(est, "clean_only", False) or hasattr(est, "components")


def _seen(est, record: FitRecord, families: dict[str, str], attacks: list[str]) -> set[str]:
    """Attacks whose examples shaped the fit: the supervised fit's attacks; for weights chosen on
    validation families, every attack of those families (the weights saw the family)."""
    if hasattr(est, "components") and record.adversarial:
        seen_families = {families[a] for a in record.adversarial}
        return {a for a in attacks if families[a] in seen_families}
    return record.seen


def _shipped_families(info: dict) -> set[str]:
    from ..attacks import ATTACKS

    return {ATTACKS[a["name"]].family for a in info.get("attacks", []) if a.get("name") in ATTACKS}


def _shipped_fitting(info: dict) -> str:
    """The bundle row's fitting set, from what fit-detector recorded in detector.json."""
    fit = info.get("fit_images", {})
    attacks = ", ".join(a["label"] for a in info.get("attacks", [])) or "none"
    noisy = f" + {fit['n_noisy']} noisy clean" if fit.get("n_noisy") else ""
    text = (
        f"fitted by fit-detector, not on this evaluation's fitting images: {fit.get('n_clean', '?')} clean "
        f"{fit.get('set', '?')} images{noisy} + {fit.get('n_adversarial', 0)} adversarial ({attacks})"
    )
    if info.get("estimator") != "PathEnsembleDetector":
        return text
    params = info.get("params", {})
    knn = f" (kNN: {params['knn_reference']} paths per class)" if "knn" in params.get("components", []) else ""
    supervised = "; supervised part on those rows" if "gb" in params.get("components", []) else ""
    weights = (
        "fixed weights"
        if params.get("weights") is not None
        else f"weights by worst held-out-family {selection_metric(info.get('selection'))} on the validation images"
    )
    return (
        f"{text}; clean-only components on {info.get('reference_images', {}).get('n', '?')} clean training "
        f"images{knn}{supervised}; {weights}"
    )


def unseen_summary(results: dict, lofo: dict, detectors: dict, families: dict[str, str]) -> dict:
    """Per detector, its worst AUROC and TPR over attacks it never saw: clean-only detectors from the main
    table (every attack is unseen), the others from leave-one-family-out."""
    out = {}
    for name, per in results.items():
        if detectors[name]["clean_only"]:
            cells = {a: per[a] for a in per}
        elif name in lofo:
            cells = {a: m for fam in lofo[name].values() for a, m in fam.items()}
        else:
            cells = {a: per[a] for a in per if not per[a].get("seen")}
        aucs = {a: m["auroc"] for a, m in cells.items() if m.get("auroc") is not None}
        tprs = {a: m["tpr_at_fpr"] for a, m in cells.items() if m.get("tpr_at_fpr") is not None}
        if not aucs:
            continue
        worst = min(aucs, key=aucs.get)
        out[name] = {
            "source": "main table (clean-only)"
            if detectors[name]["clean_only"]
            else ("leave-one-family-out" if name in lofo else "unseen cells of the main table"),
            "worst_auroc": aucs[worst],
            "worst_attack": worst,
            "min_tpr_at_fpr": min(tprs.values()),
            "per_attack": aucs,
        }
    return out
