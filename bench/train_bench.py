"""Training-step time of the gated model against its dense twin, in the same run.

Usage (always under the shared lock, one thread as the bundled models were trained)::

    env OMP_NUM_THREADS=1 .venv/bin/python -m bench.train_bench --images 2048 --repeats 10 --distill \\
        --config-from models/default --out reports/training/epoch_time.json

(the default bundle's own recipe, read from its ``bundle.json``; ``make reports-training`` runs it).

What is timed: one pass (the trainer's own step: augmentation, ``forward_path``, the full objective,
backward, AdamW, one-cycle schedule) over the first ``--images`` training images of the dataset, for the
dense twin and the gated model built from the same ``TrainConfig`` (``--set key=value`` changes its
fields; values are JSON, or plain strings; ``--config-from BUNDLE`` starts from the ``train_config`` that
trained that bundle instead of ``TrainConfig``'s defaults). The dense teacher's weights are random, so the
recipe's ``init_from`` bundle is never read. Every repetition times both, in alternating order, from fresh
models with the same seed; the ratio reported is the median over repetitions of the paired ratio
gated / dense, in wall time and in process CPU time (which waiting for a shared core does not inflate),
and the ratio of the fastest CPU times (least disturbed by neighbours on a shared machine).
With ``--distill`` the step of ``pathguard decouple`` (gated + the dense teacher's forward + KD) is timed too.
Full-epoch seconds are extrapolated per image to the training split (``--epoch-images``, 55,000 for
Fashion-MNIST with 5,000 held out for validation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from detector.bundle import read_meta
from detector.data import load_dataset
from detector.training import TrainConfig
from detector.training import trainer as T
from detector.training.decouple import as_teacher

from .helpers import REPO, emit_json

# the dense twin has no teacher: every setting that needs init_from off
_NO_TEACHER = {"init_from": None, "distill": 0.0, "distill_features": 0.0}


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def time_pass(cfg: TrainConfig, data, device: torch.device, distill: bool = False) -> tuple[float, float, dict]:
    """Wall and CPU seconds of one training pass over ``data`` from a fresh model; also the mean loss terms.

    ``distill``: the step of ``pathguard decouple``, with a dense teacher's forward pass and the KD term
    (the teacher's weights are random: the time does not depend on their values).
    """
    torch.manual_seed(cfg.seed)
    model, _ = T.build_for(cfg, data)
    model.to(device)
    teacher = None
    if distill:
        dense_cfg = TrainConfig.from_dict({**cfg.to_dict(), "gated": False, **_NO_TEACHER})
        teacher = as_teacher(T.build_for(dense_cfg, data)[0].to(device))  # prepared as the trainer prepares it
    steps = (len(data) + cfg.batch_size - 1) // cfg.batch_size
    opt = T._optimizer(model, cfg)
    sched = T._scheduler(opt, cfg, max(steps * cfg.epochs, steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    w0, c0 = time.perf_counter(), time.process_time()
    _, means = T.train_epoch(
        model,
        data,
        cfg,
        opt=opt,
        sched=sched,
        gen=gen,
        step=0,
        total_steps=steps * cfg.epochs,
        device=device,
        teacher=teacher,
    )
    return time.perf_counter() - w0, time.process_time() - c0, means


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2048, help="training images per timed pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epoch-images", type=int, default=55000, help="images of a full epoch, for extrapolation")
    ap.add_argument(
        "--distill",
        action="store_true",
        help="also time the decouple step (gated + dense teacher forward + KD), as 'decouple'",
    )
    ap.add_argument(
        "--config-from",
        metavar="BUNDLE",
        help="start from the training config recorded in BUNDLE's bundle.json (train_config), not the defaults",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig field")
    ap.add_argument("--out", help="JSON file to write (printed either way)")
    return ap


def _configs(base: TrainConfig, distill: bool) -> dict[str, TrainConfig]:
    """The dense twin, the gated model and (with ``distill``) the decouple step, all from ``base``."""
    configs = {
        "dense": TrainConfig.from_dict({**base.to_dict(), "gated": False, **_NO_TEACHER}),
        "gated": TrainConfig.from_dict({**base.to_dict(), "gated": True}),
    }
    if distill:
        configs["decouple"] = TrainConfig.from_dict(
            {
                **base.to_dict(),
                "gated": True,
                "distill": base.distill or 0.5,
                "init_from": base.init_from or "(bench: random dense teacher)",
            }
        )
    return configs


def _measure(
    configs: dict[str, TrainConfig], data, device: torch.device, repeats: int
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, dict]]:
    """(wall, CPU) seconds of every repetition per config, in alternating order; and each one's last loss terms."""
    runs: dict[str, list[tuple[float, float]]] = {n: [] for n in configs}
    terms = {}
    for r in range(repeats):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            wall, cpu, terms[name] = time_pass(configs[name], data, device, distill=name == "decouple")
            runs[name].append((wall, cpu))
            print(f"repeat {r + 1}: {name} {wall:.2f} s wall, {cpu:.2f} s cpu", file=sys.stderr)
    return runs, terms


def _report(
    args: argparse.Namespace, base: TrainConfig, overrides: dict, n_images: int, runs: dict, terms: dict
) -> dict:
    """The JSON result: the raw seconds, the paired gated / dense ratios and per-epoch estimates."""
    per_image = {n: statistics.median(w for w, _ in v) / n_images for n, v in runs.items()}
    return {
        "what": "one training pass (trainer step incl. augmentation, forward_path, objective, backward, AdamW)",
        "images": n_images,
        "batch_size": base.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "config_from": args.config_from,
        "gated_config_overrides": overrides,
        "config": base.to_dict(),
        "seconds": {n: [[round(w, 3), round(c, 3)] for w, c in v] for n, v in runs.items()},
        "ratio_wall": round(statistics.median(g[0] / d[0] for g, d in zip(runs["gated"], runs["dense"])), 3),
        "ratio_cpu": round(statistics.median(g[1] / d[1] for g, d in zip(runs["gated"], runs["dense"])), 3),
        "ratio_cpu_min": round(min(c for _, c in runs["gated"]) / min(c for _, c in runs["dense"]), 3),
        **(
            {"decouple_ratio_cpu_min": round(min(c for _, c in runs["decouple"]) / min(c for _, c in runs["dense"]), 3)}
            if "decouple" in runs
            else {}
        ),
        "epoch_cpu_seconds_estimate": {
            n: round(min(c for _, c in v) / n_images * args.epoch_images, 1) for n, v in runs.items()
        },
        "epoch_seconds_estimate": {n: round(v * args.epoch_images, 1) for n, v in per_image.items()},
        "epoch_images": args.epoch_images,
        "final_terms": {n: {k: round(v, 4) for k, v in t.items()} for n, t in terms.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "commit": git_commit(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = _value(value)
    torch.set_num_threads(args.threads)
    start = TrainConfig().to_dict()
    if args.config_from:
        recorded = read_meta(args.config_from).get("train_config")
        if not recorded:
            ap.error(f"--config-from {args.config_from}: its bundle.json records no train_config")
        start = TrainConfig.from_dict(recorded).to_dict()
    base = TrainConfig.from_dict({**start, **overrides, "threads": args.threads})
    device = torch.device("cpu")
    full = load_dataset(base.dataset, "train", base.data_root)
    data = full.subset(torch.arange(min(args.images, len(full))), ":bench")
    runs, terms = _measure(_configs(base, args.distill), data, device, args.repeats)
    emit_json(_report(args, base, overrides, len(data), runs, terms), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
