"""``pathguard decouple`` (a gated model from a trained dense bundle) and ``pathguard training-report``."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from detector.training.config import TrainConfig

from .options import add_config_arguments, config_from, opt, required, switch

# What decoupling changes from `pathguard train`'s defaults (each still a flag): distillation from the dense
# model, gates that start on but close to their threshold (a fine-tuning learning rate moves a bias of 3
# too slowly to switch anything off), the one-sided alignment and a short ramp, so the routing settles early.
DECOUPLE_DEFAULTS = {
    "distill": 0.5,
    "lr": 2e-3,
    "align_mode": "onesided",
    "aux_warmup": 0.2,
    "w_sparsity": 0.0,
    "target_flops": 0.25,
}
# Full-width controlling modules (hidden width = the layer's filters instead of a quarter): at the 24% point they
# gave 93.35% / 93.71% test over two seeds and q(y|path) 87.7% / 88.0%, against 93.16-93.38% and 82.5-84.9% with
# reduction 4 (docs/TRAINING.md, "Recipe variants"); they cost 0.25% of the dense FLOPs (0.06% at reduction 4).
# The committed bundles up to models/tradeoff/f0.24-31ep were decoupled with reduction 4 (--gate-reduction 4
# reproduces them).
DECOUPLE_GATE_DEFAULTS = {"init_bias": 0.5, "reduction": 1}
# the data, split and architecture come from the dense bundle's own training config, so the fine-tuning
# never trains on the images the dense model was validated on
_FROM_DENSE = (
    "arch",
    "dataset",
    "data_root",
    "val_size",
    "seed",
    "augment",
    "shift",
    "batch_size",
    "train_subset",
    "head_hidden",
)


@dataclass
class DecoupleRun:
    source: str = required("dense bundle to start from (same architecture, trained with --gated false)", flag="--from")
    out: str = required("bundle directory to write")
    config: str | None = opt(None, "JSON file of TrainConfig fields; flags override it")
    resume: bool = switch("continue the run in --out from its last checkpoint")
    stop_after: int | None = opt(None, "stop once this epoch is checkpointed (continue later with --resume)")
    quiet: bool = switch("no progress bar")


def decouple_base(source: str) -> TrainConfig:
    """The fine-tuning config before flags: the dense bundle's data and split, :data:`DECOUPLE_DEFAULTS`."""
    from detector.bundle import read_meta

    meta = read_meta(source)
    dense = meta.get("train_config") or {}
    defaults = TrainConfig().to_dict()
    values = {
        **defaults,
        **{k: dense[k] for k in _FROM_DENSE if k in dense},
        **DECOUPLE_DEFAULTS,
        "arch": meta["arch"],
        "gated": True,
        "init_from": str(source),
    }
    values["gate"] = {**defaults["gate"], **DECOUPLE_GATE_DEFAULTS}
    return TrainConfig.from_dict(values)


def _cmd_decouple(args: argparse.Namespace) -> int:
    from detector.training import train
    from detector.training.checkpoint import read_config

    run = config_from(DecoupleRun, args)
    if run.config:
        base = TrainConfig.from_dict(json.loads(Path(run.config).read_text()))
    elif run.resume:
        base = read_config(run.out)
    else:
        base = decouple_base(run.source)
    cfg = config_from(TrainConfig, args, base=base)
    if cfg.init_from != run.source:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "init_from": run.source})
    metrics = train(cfg, run.out, progress=not run.quiet, resume=run.resume, stop_after=run.stop_after)
    print(json.dumps(metrics, indent=2))
    return 0


@dataclass
class ReportRun:
    bundles: tuple[str, ...] = opt((), "trained bundles, one point each", nargs="+", required=True)
    dense: tuple[str, ...] = opt(
        (),
        "the dense twin the gap is measured against: one for all bundles, or one per bundle in their order "
        "(a twin trained as many epochs in all as that decoupled model)",
        nargs="*",
    )
    evaluation: tuple[str, ...] = opt(
        (), "evaluation report.json files (matched to bundles by model digest)", nargs="*"
    )
    detector: str = opt("path", "detector whose AUROC the report shows")
    out: str = opt("reports/training", "folder for tradeoff.json, tradeoff.md and tradeoff.png")


def _cmd_report(args: argparse.Namespace) -> int:
    from detector.training.report import tradeoff_report

    run = config_from(ReportRun, args)
    report = tradeoff_report(
        list(run.bundles),
        run.out,
        dense=list(run.dense) or None,
        evaluations=list(run.evaluation),
        detector=run.detector,
    )
    print((Path(run.out) / "tradeoff.md").read_text())
    return 0 if report["points"] else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decouple",
        help="turn a trained dense bundle into a decoupled (gated) one",
        description="Initialise the gated network from a dense bundle of the same architecture "
        "(every gate on: it starts at the dense accuracy), then fine-tune it with distillation "
        "from the dense model towards --target-flops. Data, split and architecture come from the "
        "dense bundle; every training setting is a flag. A checkpoint is written every epoch.",
    )
    add_config_arguments(p, DecoupleRun)
    shown = {**DECOUPLE_DEFAULTS, **{f"gate_{k}": v for k, v in DECOUPLE_GATE_DEFAULTS.items()}}
    add_config_arguments(p, TrainConfig, skip=("init_from", "gated"), shown=shown)
    p.set_defaults(func=_cmd_decouple)
    p = sub.add_parser(
        "training-report",
        help="accuracy / FLOPs trade-off of trained bundles against the dense twin",
        description="Write tradeoff.json, tradeoff.md and tradeoff.png from the bundles' own test "
        "metrics (and evaluation reports' AUROC where given).",
    )
    add_config_arguments(p, ReportRun)
    p.set_defaults(func=_cmd_report)
