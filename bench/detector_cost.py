"""Scoring cost of a bundle's detector, in forward passes: what ``pathguard evaluate`` reports as
``score_cost_ratio``, measured on its own with paired repetitions.

Usage::

    .venv/bin/python -m bench.detector_cost --bundle models/default --json reports/evaluation/detector_cost.json

What is timed, per image, on the first ``--n`` test images of the bundle's dataset, in batches of 500 as the
evaluation does:

``forward``     the plain forward pass (logits only), the denominator.
``features``    the path features the detector reads (``forward_path`` plus prototype distances, confidence).
``decision``    the fitted detector's ``decision_function`` on those features; for an ensemble also each
                component it computes (weight > 0) on its own.

Every repetition runs the three once, in a rotated order, and the ratio ``(features + decision) / forward`` is
the median over repetitions of the paired ratio from the same repetition (the machine is shared, so absolute
times drift). The load average and the stored size of the detector are recorded with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from detector.bundle import default_bundle, load_bundle
from detector.features import extract_path_features
from detector.splits import bundle_splits

from .helpers import emit_json

BATCH = 500


@torch.no_grad()
def _forward(model, images) -> None:
    for i in range(0, len(images), BATCH):
        model(images[i : i + BATCH])


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(bundle_path: str, n: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    bundle = load_bundle(bundle_path)
    model, protos, det = bundle.model.eval(), bundle.prototypes(), bundle.detector()
    if det is None or protos is None:
        raise SystemExit(f"{bundle_path} has no fitted detector; run pathguard fit-detector first")
    images = bundle_splits(bundle.meta, None).test.float_images(torch.arange(n))
    X = extract_path_features(model, protos, images, batch_size=BATCH).X
    used = [] if not hasattr(det, "components_") else [int(i) for i in np.flatnonzero(det.weights_ > 0)]
    steps = {
        "forward": lambda: _forward(model, images),
        "features": lambda: extract_path_features(model, protos, images, batch_size=BATCH),
        "decision": lambda: det.decision_function(X),
    }
    for i in used:
        steps[f"component {det.components[i]}"] = lambda i=i: det.components_[i].neg_log_p(X)
    for fn in steps.values():  # warm-up
        fn()
    names, rows = list(steps), []
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        rows.append({k: _time(steps[k]) / n for k in order})
    ratios = [(row["features"] + row["decision"]) / row["forward"] for row in rows]
    size = sum(p.stat().st_size for p in Path(bundle_path).glob("detector.*"))
    return {
        "bundle": str(bundle_path),
        "estimator": type(det).__name__,
        "n": n,
        "repeats": repeats,
        "threads": threads,
        "score_cost_ratio": statistics.median(ratios),
        "score_cost_ratios": ratios,
        "median_seconds_per_image": {k: statistics.median(row[k] for row in rows) for k in names},
        "detector_bytes": size,
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=None, help="bundle directory (default: the default bundle)")
    p.add_argument("--n", type=int, default=1000, help="test images")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None, help="write the result here too")
    args = p.parse_args(argv)
    emit_json(measure(str(args.bundle or default_bundle()), args.n, args.repeats, args.threads), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
