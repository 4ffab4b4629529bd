"""The offline subcommands: train, info, data fetch, attack, fit-detector, evaluate (decouple: training.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from detector.bundle import BUNDLE_HELP, default_bundle
from detector.evaluation.config import EvalConfig
from detector.fitting import FitConfig
from detector.training.config import TrainConfig

from .options import add_command, config_from, opt, required, switch


@dataclass
class TrainRun:
    out: str = required("bundle directory to write")
    config: str | None = opt(None, "JSON file of TrainConfig fields; flags override it")
    resume: bool = switch("continue the run in --out from its last checkpoint (its config, unless --config)")
    stop_after: int | None = opt(None, "stop once this epoch is checkpointed (continue later with --resume)")
    quiet: bool = switch("no progress bar")


def _cmd_train(args: argparse.Namespace) -> int:
    from detector.training import train
    from detector.training.checkpoint import read_config

    run = config_from(TrainRun, args)
    base = None
    if run.config:
        base = TrainConfig.from_dict(json.loads(Path(run.config).read_text()))
    elif run.resume:
        base = read_config(run.out)
    cfg = config_from(TrainConfig, args, base=base)
    metrics = train(cfg, run.out, progress=not run.quiet, resume=run.resume, stop_after=run.stop_after)
    print(json.dumps(metrics, indent=2))
    return 0


@dataclass
class InfoRun:
    bundle: str | None = opt(None, BUNDLE_HELP, positional=True)
    json: bool = switch("print bundle.json as is")


def _cmd_info(args: argparse.Namespace) -> int:
    from detector.bundle import load_bundle
    from detector.describe import describe_bundle

    run = config_from(InfoRun, args)
    bundle = load_bundle(run.bundle or default_bundle())
    print(json.dumps(bundle.meta, indent=2) if run.json else describe_bundle(bundle))
    return 0


@dataclass
class FetchRun:
    data_root: str | None = opt(None, "folder to look in or download to")


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from detector.data import fetch_fashion_mnist

    run = config_from(FetchRun, args)
    print(fetch_fashion_mnist(Path(run.data_root) if run.data_root else None))
    return 0


@dataclass
class AttackRun:
    bundle: str = opt("", BUNDLE_HELP)
    attack: str = required("fgsm, bim, pgd, pgdl2, cw, deepfool, apgd; parameters as pgd:eps=0.05,steps=40")
    eps: float | None = opt(None, "budget in [0, 1] pixel space (Linf) or L2 norm")
    steps: int | None = opt(None, "steps of an iterative attack")
    c: float | None = opt(None, "CW's confidence weight")
    n: int = opt(1000, "number of images")
    split: str = opt("test", choices=("test", "val"))
    seed: int = opt(0)
    batch_size: int = opt(250)
    data_root: str | None = opt(None)
    out: str = required(".npz file to write")
    quiet: bool = switch("no progress bar")


def _cmd_attack(args: argparse.Namespace) -> int:
    import torch

    from detector.attacks import parse_attack, save_result
    from detector.attacks.runner import run_attack
    from detector.bundle import load_bundle
    from detector.splits import bundle_splits, correctly_classified

    run = config_from(AttackRun, args)
    spec = parse_attack(run.attack)
    overrides = {k: v for k, v in (("eps", run.eps), ("steps", run.steps), ("c", run.c)) if v is not None}
    if overrides:
        spec = type(spec)(spec.name, {**spec.params, **overrides}, spec.label)
    bundle_path = run.bundle or default_bundle()
    bundle = load_bundle(bundle_path)
    splits = bundle_splits(bundle.meta, run.data_root)
    data = splits.test if run.split == "test" else splits.val
    idx = correctly_classified(bundle.model, data, run.n, seed=run.seed)
    images, labels = data.float_images(idx), data.labels[idx]
    res = run_attack(
        bundle.model, images, labels, spec, seed=run.seed, batch_size=run.batch_size, progress=not run.quiet
    )
    with torch.no_grad():
        pred = bundle.model(res.adversarial).argmax(1)
    success = (pred != labels).float().mean().item()
    pert = res.perturbation(images)
    save_result(
        Path(run.out),
        res,
        {"bundle": str(bundle_path), "split": data.name, "indices": idx.tolist(), "success_rate": success},
    )
    print(
        json.dumps(
            {
                "out": run.out,
                "attack": spec.name,
                "params": spec.params,
                "n": len(idx),
                "success_rate": round(success, 4),
                "mean_l2": round(pert["l2"].mean().item(), 4),
                "max_linf": round(pert["linf"].max().item(), 4),
                "seconds": round(res.seconds, 1),
            },
            indent=2,
        )
    )
    return 0


@dataclass
class QuietRun:
    quiet: bool = switch("no progress bar")


def _cmd_fit_detector(args: argparse.Namespace) -> int:
    from detector.fitting import fit_bundle_detector

    cfg = config_from(FitConfig, args)
    cfg.bundle = cfg.bundle or default_bundle()
    info = fit_bundle_detector(cfg, progress=not config_from(QuietRun, args).quiet)
    print(
        json.dumps(
            {
                k: info[k]
                for k in (
                    "classifier",
                    "feature_groups",
                    "threshold",
                    "target_fpr",
                    "per_attack",
                    "fit_images",
                    "fit_seconds",
                    "weights",
                )
                if k in info
            },
            indent=2,
        )
    )
    return 0


def _parse_shard(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    try:
        shard, total = int(i), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r} must look like I/N, e.g. 0/4") from None
    if total < 1 or not 0 <= shard < total:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= I < N")
    return shard, total


@dataclass
class EvaluateRun:
    out: str = opt("", "output directory (required)")
    shard: tuple[int, int] | None = opt(
        None, "I/N: compute shard I (0-based) of N and stop", parse=_parse_shard, metavar="I/N"
    )
    json: bool = switch("print results as JSON instead of the Markdown report")
    quiet: bool = switch("no progress bars")
    threads: int = opt(0, "torch CPU threads (0: torch's default; 1 is faster while other jobs keep the cores busy)")


@dataclass
class MergeRun:
    out: str = required("directory whose shards/ to merge")
    json: bool = switch("print results as JSON instead of the Markdown report")
    quiet: bool = switch("no progress bars")
    threads: int = opt(0, "torch CPU threads (0: torch's default; 1 is faster while other jobs keep the cores busy)")


def _eval_config(args: argparse.Namespace) -> EvalConfig:
    cfg = config_from(EvalConfig, args)
    cfg.bundle = cfg.bundle or default_bundle()
    return cfg


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from detector.evaluation import merge, run, run_shard
    from detector.runtime import set_threads

    opts = config_from(MergeRun if args.merge else EvaluateRun, args)
    if not opts.out:
        raise ValueError("--out DIR is required")
    out = Path(opts.out)
    if opts.threads:
        set_threads(opts.threads)
    if args.merge:
        given = any(getattr(args, k, None) is not None for k in ("bundle", "attacks", "n", "n_fit", "seed"))
        report = merge(out, _eval_config(args) if given else None, progress=not opts.quiet)
    elif opts.shard is not None:
        path = run_shard(_eval_config(args), *opts.shard, out, progress=not opts.quiet)
        print(f"wrote {path}")
        return 0
    else:
        report = run(_eval_config(args), out, progress=not opts.quiet)
    print((out / "report.md").read_text() if not opts.json else json.dumps(report["results"], indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    add_command(
        sub,
        "train",
        _cmd_train,
        TrainRun,
        TrainConfig,
        help="train a decoupled (or dense) model into a bundle directory",
    )
    add_command(sub, "info", _cmd_info, InfoRun, help="describe a bundle")
    p = sub.add_parser("data", help="dataset utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    add_command(
        dsub,
        "fetch",
        _cmd_data_fetch,
        FetchRun,
        help="make Fashion-MNIST available (Debian package or upstream download)",
    )
    add_command(
        sub,
        "attack",
        _cmd_attack,
        AttackRun,
        help="attack correctly classified images of a bundle's dataset; save as .npz",
    )
    add_command(
        sub,
        "fit-detector",
        _cmd_fit_detector,
        FitConfig,
        QuietRun,
        help="compute class prototypes and fit the bundle's path detector",
    )
    p = add_command(
        sub,
        "evaluate",
        _cmd_evaluate,
        EvaluateRun,
        EvalConfig,
        help="offline attack-evaluation suite; `evaluate merge` joins shards",
        description="Attack test images, fit and calibrate every detector, and write report.json, "
        "report.md and figures to --out. With --shard I/N only the adversarial images of shard I are "
        "computed; `pathguard evaluate merge --out DIR` then writes the report.",
    )
    p.set_defaults(merge=False)
    msub = p.add_subparsers(dest="evaluate_command")
    m = add_command(
        msub,
        "merge",
        _cmd_evaluate,
        MergeRun,
        EvalConfig,
        help="merge DIR/shards/* into the report a single run writes",
    )
    m.set_defaults(merge=True, shard=None)
