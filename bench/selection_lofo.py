"""Does the ensemble's weight selection generalise to a family it never saw? Nested leave-one-family-out on
validation images only.

Which weights should ``pathguard fit-detector`` give the ensemble: fixed ones (and which: ``FIXED_VECTORS``), or
chosen by the worst held-out family on validation rows (and by which rule)? This bench holds one family out of each
whole procedure and scores it on the held-out family's own validation rows:
for each family f, each procedure (a weight-selection rule, or fixed weights) is fitted on the bundle's recipe
rows (``bench.bundle_lofo.recipe_rows``: fit-detector's validation images, attacks, noisy negatives, calibration
and reference rows) without any row of f, and f's successful attacks are scored against the calibration images'
clean rows, at the threshold set there at the target false-positive rate. No test image is read, so this is where
a procedure may be chosen; ``bench.bundle_lofo`` then measures the shipped one on test images. The comparison:
which attacks stay under the target TPR, and the lowest TPR on the attacks the evaluation reports.

Usage (attacks reused from ``--cache-dir``)::

    .venv/bin/python -m bench.selection_lofo --bundle models/default --cache-dir cache/attacks \\
        --json reports/evaluation/selection_lofo.json
"""

from __future__ import annotations

import argparse
import time

import torch

from detector.attacks import parse_attacks
from detector.bundle import default_bundle, load_bundle
from detector.detectors.ensemble import (
    DEFAULT_COMPONENTS,
    PLAIN_TIES,
    SHIPPED_WEIGHTS,
    STOP34_COMPONENTS,
    PathEnsembleDetector,
    shipped_weights,
)
from detector.evaluation.config import EvalConfig
from detector.evaluation.metrics import detection_metrics

from .bundle_lofo import RecipeRows, recipe_rows
from .helpers import emit_json

# Fixed weight vectors of stop 34's five components (joint, knn, summary, margin, gb) compared with its shipped one:
# equal weights (shipped in stop 32), one or two components raised or lowered (stop 33), and the shipped vector with
# the supervised weight raised (stop 34).
FIXED_VECTORS = {
    "equal (stop 32)": (1.0, 1.0, 1.0, 1.0, 1.0),
    "margin 1.25": (1.0, 1.0, 1.0, 1.25, 1.0),
    "margin 1.5": (1.0, 1.0, 1.0, 1.5, 1.0),
    "margin 2": (1.0, 1.0, 1.0, 2.0, 1.0),
    "joint 1.5, margin 1.5": (1.5, 1.0, 1.0, 1.5, 1.0),
    "knn 0.5": (1.0, 0.5, 1.0, 1.0, 1.0),
    "knn 0.5, summary 0.5": (1.0, 0.5, 0.5, 1.0, 1.0),
    "knn 0.75, summary 0.75": (1.0, 0.75, 0.75, 1.0, 1.0),
    "gb 0.5": (1.0, 1.0, 1.0, 1.0, 0.5),
    "summary 0.5, gb 1.25": (1.0, 1.0, 0.5, 1.0, 1.25),
    "summary 0.5, gb 1.5": (1.0, 1.0, 0.5, 1.0, 1.5),
}
FIVE = {"components": STOP34_COMPONENTS}
STOP34_WEIGHTS = shipped_weights(STOP34_COMPONENTS)
# Procedures compared: keyword arguments of PathEnsembleDetector on top of the recipe's.
SELECT = {"weights": None}  # choose the weights on validation (the recipe may fix them)
PROCEDURES = {
    "shipped: 6 components (input consistency added), fixed weights, summary 0.5 (stop 35)": {
        "weights": SHIPPED_WEIGHTS
    },
    "5 components, fixed weights, summary 0.5 (shipped in stops 33-34)": {**FIVE, "weights": STOP34_WEIGHTS},
    "5 components, weights from {0, 0.5, 1} by worst held-out AUROC, ties within 0.002: more weights (stop 31)": {
        **FIVE,
        **SELECT,
        "weight_tolerance": 0.002,
        "prefer": "more",
    },
    "same, ties within 0.002: fewer weights": {**FIVE, **SELECT, "weight_tolerance": 0.002, "prefer": "fewer"},
    "plain rule: same without a tolerance (ties: mean AUROC, fewer weights)": {**FIVE, **SELECT, **PLAIN_TIES},
    "plain rule by worst held-out TPR": {**FIVE, **SELECT, **PLAIN_TIES, "select_by": "tpr"},
    "joint, margin, gb, weights from {0.5, 1} (none dropped)": {
        **SELECT,
        **PLAIN_TIES,
        "components": ("joint", "margin", "gb"),
        "grid": (0.5, 1.0),
    },
    "joint, margin, gb, equal fixed weights": {"components": ("joint", "margin", "gb"), "weights": (1.0, 1.0, 1.0)},
    **{f"5 components, fixed weights: {label}": {**FIVE, "weights": w} for label, w in FIXED_VECTORS.items()},
    # stop 35: the input-consistency score at other weights beside the shipped ones (1 is shipped)
    **{
        f"6 components, shipped weights but input {w}": {
            "weights": tuple(w if c == "input" else x for c, x in zip(DEFAULT_COMPONENTS, SHIPPED_WEIGHTS))
        }
        for w in (0.75, 1.25, 1.5)
    },
}
# What the procedures are compared on: the target TPR, on the attacks that the evaluation's default matrix
# also runs (fit-detector's budget variant pgdl2:eps=0.75 is fitted on but never reported).
TARGET_TPR = 0.85
REPORTED = {s.label for s in parse_attacks(EvalConfig().attacks)}


def _make(r: RecipeRows, overrides: dict) -> PathEnsembleDetector:
    """fit-detector's ensemble for the bundle's recipe, with the procedure's parameters instead."""
    return r.cfg.ensemble().set_params(**overrides)


def nested(r: RecipeRows, overrides: dict) -> dict:
    """Per attack of each held-out family: AUROC and TPR of the procedure fitted without that family."""
    det = _make(r, overrides)
    out = {}
    for i, family in enumerate(sorted(set(r.family.values()))):
        if i == 0:  # the clean-only components once; then only what depends on adversarial rows, again
            det.fit(
                r.X_ref,
                groups=r.rows.groups,
                layer_sizes=r.layer_sizes,
                X_calibration=r.X_cal,
                validation=r.without(family),
            )
        else:
            det.fit_validation(r.without(family), r.X_cal, X_reference=r.X_ref)
        clean = det.decision_function(r.X_cal)
        weights = {c: w for c, w in zip(det.components, det.weights_.tolist()) if w > 0}
        for attack in sorted(a for a, f in r.family.items() if f == family):
            m = detection_metrics(clean, det.decision_function(r.rows.X[r.rows.source == attack]), det.threshold_)
            out[attack] = {"family": family, "auroc": m["auroc"], "tpr_at_fpr": m["tpr_at_fpr"], "weights": weights}
    return out


def measure(bundle_path: str, cache_dir: str | None, threads: int, names: list[str]) -> dict:
    torch.set_num_threads(threads)
    r = recipe_rows(load_bundle(bundle_path), bundle_path, cache_dir)
    result = {}
    for name in names:
        t0 = time.perf_counter()
        per = nested(r, PROCEDURES[name])
        reported = {a: v for a, v in per.items() if a in REPORTED}
        result[name] = {
            "worst_auroc": min(v["auroc"] for v in per.values()),
            "lowest_tpr": min(v["tpr_at_fpr"] for v in per.values()),
            "lowest_tpr_reported_attacks": min((v["tpr_at_fpr"] for v in reported.values()), default=None),
            "under_target_tpr": sorted(a for a, v in per.items() if v["tpr_at_fpr"] < TARGET_TPR),
            "per_attack": per,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return {
        "images": (
            f"validation only: fit-detector's {r.cfg.n_fit} fitting images and their successful attacks (the held-out "
            f"family's are scored), {len(r.X_cal)} calibration images (the clean rows scored and the threshold at "
            f"{r.cfg.target_fpr:.0%} FPR), {len(r.X_ref)} clean training images (clean-only components)"
        ),
        "target_tpr": TARGET_TPR,
        "reported_attacks": sorted(REPORTED),
        "procedures": result,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bundle", default=str(default_bundle()))
    ap.add_argument("--cache-dir", default=None, help="reuse attacks computed before (and keep those computed now)")
    ap.add_argument("--procedures", default=",".join(str(i) for i in range(len(PROCEDURES))), help="indices to run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    names = [list(PROCEDURES)[int(i)] for i in args.procedures.split(",")]
    t0 = time.perf_counter()
    result = measure(args.bundle, args.cache_dir, args.threads, names)
    emit_json({"bundle": args.bundle, **result, "seconds": round(time.perf_counter() - t0, 1)}, args.json)


if __name__ == "__main__":
    main()
