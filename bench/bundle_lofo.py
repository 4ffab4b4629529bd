"""Leave one family out with the shipped recipe at its own size: would the bundle's detector catch a family of
attacks it never saw?

``pathguard evaluate`` answers that for the recipe refitted on the evaluation's own fitting images (the
``path-ensemble`` row of its leave-one-family-out table: 500 validation images, the evaluation's attacks). This
bench asks it of the recipe exactly as ``pathguard fit-detector`` fits the bundle: the same validation images
(1,000), attacks, noisy negatives, calibration images (1,000 others), clean reference and weight selection, with
every row of one family removed before fitting: its adversarial rows and their noisy twins, so the supervised
component never learns it and the weight selection never scores it. Each refit is then scored on the test images
that ``pathguard evaluate`` scores (its 500 correctly classified test images, same seed) against that family's
successful attacks from the evaluation's default attack matrix. A refit on every family, scored on every attack,
is the reference row: it should reproduce the shipped detector (its weights, when they are chosen).

Usage (attacks are reused from ``--cache-dir`` when fit-detector or an earlier run made them)::

    .venv/bin/python -m bench.bundle_lofo --bundle models/default --cache-dir cache/attacks \\
        --json reports/evaluation/bundle_lofo.json
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from detector.adaptive.hardening import base_training_set
from detector.attacks import parse_attacks
from detector.attacks.runner import cached_attack
from detector.bundle import default_bundle, load_bundle
from detector.detectors.ensemble import PLAIN_TIES
from detector.evaluation.config import EvalConfig
from detector.evaluation.metrics import detection_metrics
from detector.features import extract_path_features
from detector.fitting import FitConfig, TrainingRows
from detector.splits import Splits, bundle_splits, correctly_classified

from .helpers import emit_json


def recipe(bundle, bundle_path: str, cache_dir: str | None) -> FitConfig:
    """The FitConfig that fitted the bundle's ensemble, from its detector.json (fit-detector's defaults for the
    rest: the candidate components and weight grid, which the record keeps only pruned)."""
    part = bundle.parts.get("detector")
    if part is None or part[1].get("estimator") != "PathEnsembleDetector":
        raise SystemExit(f"{bundle_path} has no ensemble detector; run `pathguard fit-detector --bundle {bundle_path}`")
    info = part[1]
    fit, params = info["fit_images"], info["params"]
    fixed = params.get("weights")  # None: chosen on validation from fit-detector's candidate components
    weights = {} if fixed is None else {"components": ",".join(params["components"]), "weights": _csv(fixed)}
    return FitConfig(
        bundle=bundle_path,
        **({"weights": "select"} | weights),
        attacks=",".join(a["label"] for a in info["attacks"]),
        n_fit=fit["n_clean"],
        n_calibration=info["calibration_images"]["n"],
        seed=fit["seed"],
        noisy_negatives=fit.get("n_noisy", 0) > 0,
        n_reference=info["reference_images"]["n"],
        knn_reference_grid=",".join(str(v) for v in params["knn_reference_grid"] or [params["knn_reference"]]),
        select_by=params["select_by"],
        **{k: params.get(k, plain) for k, plain in PLAIN_TIES.items()},  # saved before the tolerance: plain rule
        target_fpr=info["target_fpr"],
        cache_dir=cache_dir,
    )


def _csv(values) -> str:
    return ",".join(f"{float(v):g}" for v in values)


def _test_rows(bundle, splits, ev: EvalConfig, seconds: dict) -> tuple[np.ndarray, dict, dict]:
    """Features of the evaluation's test images and of their successful attacks, by attack label."""
    model, protos = bundle.model.eval(), bundle.prototypes()
    idx = correctly_classified(model, splits.test, ev.n, seed=ev.seed)
    images, labels = splits.test.float_images(idx), splits.test.labels[idx]
    clean = extract_path_features(model, protos, images).X
    adv, families = {}, {}
    for spec in parse_attacks(ev.attacks):
        t0 = time.perf_counter()
        res = cached_attack(
            model,
            bundle.model_digest,
            images,
            labels,
            spec,
            cache_dir=Path(ev.cache_dir) if ev.cache_dir else None,
            seed=ev.seed,
            progress=False,
        )
        feats = extract_path_features(model, protos, res.adversarial)
        adv[spec.label] = feats.X[(feats.logits.argmax(1) != labels).numpy()]
        families[spec.label] = spec.family
        seconds[spec.label] = round(time.perf_counter() - t0, 1)
    return clean, adv, families


def _scores(det, clean: np.ndarray, adv: dict, labels: list[str]) -> dict:
    c = det.decision_function(clean)
    out = {}
    for label in labels:
        m = detection_metrics(c, det.decision_function(adv[label]), det.threshold_)
        out[label] = {k: m[k] for k in ("auroc", "tpr_at_fpr", "fpr_at_threshold", "n_adv")}
    return out


def _fit_record(det, seconds: float) -> dict:
    sel = det.selection_ or {}
    return {
        "weights": {c: w for c, w in zip(det.components, det.weights_.tolist()) if w > 0},
        "knn_reference_per_class": (sel.get("knn_reference") or {}).get("chosen"),
        "validation_families": sel.get("families"),
        "worst_held_out_validation_auroc": sel.get("chosen", {}).get("worst_auroc"),
        "threshold": det.threshold_,
        "fit_seconds": round(seconds, 1),
    }


@dataclass
class RecipeRows:
    """What fit-detector fits a bundle's ensemble on: validation rows by attack, calibration and reference rows."""

    cfg: FitConfig
    splits: Splits
    rows: TrainingRows
    X_cal: np.ndarray
    X_ref: np.ndarray
    family: dict[str, str]  # attack label -> family, of the fitting attacks
    layer_sizes: list[int]

    def without(self, family: str):
        """The ensemble's validation rows with every row of ``family`` left out (adversarial and noisy twins)."""
        val = self.rows.validation({a: f for a, f in self.family.items() if f != family})
        assert family not in val.adversarial and family not in val.noisy, family
        return val


def recipe_rows(bundle, bundle_path: str, cache_dir: str | None) -> RecipeRows:
    """The bundle's recipe and its rows, rebuilt from detector.json as hardening rebuilds them."""
    cfg = recipe(bundle, bundle_path, cache_dir)
    splits = bundle_splits(bundle.meta, cfg.data_root)
    protos = bundle.prototypes()
    base = base_training_set(bundle, splits, protos, cache_dir=Path(cache_dir) if cache_dir else None)
    family = {s.label: s.family for s in parse_attacks(cfg.attacks)}
    return RecipeRows(cfg, splits, base.rows, base.X_calibration, base.X_reference, family, list(protos.layer_sizes))


def measure(ev: EvalConfig, threads: int) -> dict:
    """``ev``: the test images and attacks scored (``pathguard evaluate``'s: bundle, n, seed, attacks, cache)."""
    torch.set_num_threads(threads)
    bundle = load_bundle(ev.bundle)
    r = recipe_rows(bundle, ev.bundle, ev.cache_dir)
    cfg, splits, rows, X_cal, X_ref, val_family = r.cfg, r.splits, r.rows, r.X_cal, r.X_ref, r.family
    attack_seconds: dict = {}
    clean, adv, test_family = _test_rows(bundle, splits, ev, attack_seconds)

    t0 = time.perf_counter()
    det = cfg.ensemble().fit(
        X_ref,
        groups=rows.groups,
        layer_sizes=r.layer_sizes,
        X_calibration=X_cal,
        validation=rows.validation(val_family),
    )
    shipped = bundle.detector()
    result = {
        "all_families": {
            "fit": _fit_record(det, time.perf_counter() - t0),
            "test": _scores(det, clean, adv, list(adv)),
        },
        "shipped_detector": {"test": _scores(shipped, clean, adv, list(adv))},
        "held_out": {},
    }
    for family in sorted(set(val_family.values())):
        t0 = time.perf_counter()
        det.fit_validation(r.without(family), X_cal, X_reference=X_ref)
        labels = [a for a, f in test_family.items() if f == family]
        result["held_out"][family] = {
            "fitted_without": sorted(a for a, f in val_family.items() if f == family),
            "fit": _fit_record(det, time.perf_counter() - t0),
            "test": _scores(det, clean, adv, labels),
        }
    result["attack_seconds"] = attack_seconds
    result["images"] = (
        f"fitting and calibration: fit-detector's ({cfg.n_fit} + {cfg.n_calibration} {splits.val.name} images, seed "
        f"{cfg.seed}; clean reference: the first {cfg.n_reference} {splits.train.name} images); scored: "
        f"pathguard evaluate's {len(clean)} correctly classified {splits.test.name} images (seed {ev.seed}) and "
        f"their successful attacks; thresholds from the calibration images at {cfg.target_fpr:.0%} FPR"
    )
    return result


def summary(result: dict) -> dict:
    """Worst AUROC and lowest TPR over the held-out families' test attacks, and where each was."""
    cells = [(a, m) for fam in result["held_out"].values() for a, m in fam["test"].items() if m["n_adv"]]
    worst_auroc = min(cells, key=lambda c: c[1]["auroc"])
    lowest_tpr = min(cells, key=lambda c: c[1]["tpr_at_fpr"])
    return {
        "worst_unseen_auroc": {"attack": worst_auroc[0], "auroc": worst_auroc[1]["auroc"]},
        "lowest_unseen_tpr": {"attack": lowest_tpr[0], "tpr_at_fpr": lowest_tpr[1]["tpr_at_fpr"]},
    }


def main(argv: list[str] | None = None) -> None:
    ev = EvalConfig(bundle="")
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bundle", default=str(default_bundle()))
    ap.add_argument("--attacks", default=ev.attacks, help="the test attacks (default: pathguard evaluate's)")
    ap.add_argument("--n", type=int, default=ev.n, help="test images attacked and scored")
    ap.add_argument("--cache-dir", default=None, help="reuse attacks computed before (and keep those computed now)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ev = EvalConfig(bundle=args.bundle, attacks=args.attacks, n=args.n, cache_dir=args.cache_dir)
    result = measure(ev, args.threads)
    result = {
        "bundle": args.bundle,
        "summary": summary(result),
        **result,
        "seconds": round(time.perf_counter() - t0, 1),
        "threads": args.threads,
    }
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
