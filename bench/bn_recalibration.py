"""Does re-estimating batch-norm statistics close part of the gap between a decoupled bundle and its dense twin?

A gated network's running batch-norm statistics are averages over training batches seen while its weights and
paths were still moving, on augmented images. This recomputes them once with the final weights: every
un-augmented training image of the bundle's split, in train mode (hard gates, as at inference), cumulative
average, then scores validation and test accuracy before and after, for each bundle given, e.g. the default
and its twin:

    .venv/bin/python -m bench.bn_recalibration --bundles models/default models/tradeoff/dense-36ep \
        --json reports/training/bn_recalibration.json

The bundles on disk are not changed. Decide on the validation column; the test column is what it would report.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from detector.bundle import load_bundle
from detector.data import ImageDataset
from detector.splits import accuracy, bundle_splits

from .helpers import emit_json


@torch.no_grad()
def recalibrate(model: nn.Module, data: ImageDataset, batch_size: int, seed: int) -> None:
    """Running statistics of every BatchNorm2d re-estimated on ``data`` (cumulative average, train-mode passes)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(data), batch_size):
        model(data.float_images(order[start : start + batch_size]))
    model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", nargs="+", required=True)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for path in args.bundles:
        bundle = load_bundle(path)
        splits = bundle_splits(bundle.meta)
        before = {"val": accuracy(bundle.model, splits.val), "test": accuracy(bundle.model, splits.test)}
        recalibrate(bundle.model, splits.train, args.batch_size, args.seed)
        after = {"val": accuracy(bundle.model, splits.val), "test": accuracy(bundle.model, splits.test)}
        rows.append({"bundle": path, "gated": bundle.meta["gated"], "before": before, "after": after})
    emit_json({"batch_size": args.batch_size, "threads": args.threads, "seed": args.seed, "bundles": rows}, args.json)


if __name__ == "__main__":
    main()
