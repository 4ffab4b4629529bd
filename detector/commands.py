"""Subcommands of the offline side: attack, fit-detector, evaluate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_args import add_dataclass_arguments, dataclass_from_args


def _default_bundle() -> str:
    from .cli import default_bundle

    return default_bundle()


def _cmd_attack(args: argparse.Namespace) -> int:
    import torch

    from .attacks import parse_attack, save_result
    from .attacks.runner import run_attack
    from .bundle import load_bundle
    from .splits import bundle_splits, correctly_classified

    spec = parse_attack(args.attack)
    overrides = {k: v for k, v in (("eps", args.eps), ("steps", args.steps), ("c", args.c)) if v is not None}
    if overrides:
        spec = type(spec)(spec.name, {**spec.params, **overrides}, spec.label)
    bundle = load_bundle(args.bundle)
    splits = bundle_splits(bundle.meta, args.data_root)
    data = splits.test if args.split == "test" else splits.val
    idx = correctly_classified(bundle.model, data, args.n, seed=args.seed)
    images, labels = data.float_images(idx), data.labels[idx]
    res = run_attack(bundle.model, images, labels, spec, seed=args.seed, batch_size=args.batch_size,
                     progress=not args.quiet)
    with torch.no_grad():
        pred = bundle.model(res.adversarial).argmax(1)
    success = (pred != labels).float().mean().item()
    pert = res.perturbation(images)
    save_result(Path(args.out), res, {"bundle": str(args.bundle), "split": data.name, "indices": idx.tolist(),
                                     "success_rate": success})
    print(json.dumps({"out": args.out, "attack": spec.name, "params": spec.params, "n": len(idx),
                      "success_rate": round(success, 4), "mean_l2": round(pert["l2"].mean().item(), 4),
                      "max_linf": round(pert["linf"].max().item(), 4), "seconds": round(res.seconds, 1)}, indent=2))
    return 0


def _cmd_fit_detector(args: argparse.Namespace) -> int:
    from .attacks import parse_attacks
    from .fitting import fit_bundle_detector

    info = fit_bundle_detector(args.bundle, parse_attacks(args.attacks), n_fit=args.n_fit,
                               n_calibration=args.n_calibration, classifier=args.classifier,
                               feature_groups=args.features.split(","), target_fpr=args.target_fpr, seed=args.seed,
                               data_root=args.data_root, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                               n_reference=args.n_reference, progress=not args.quiet)
    print(json.dumps({k: info[k] for k in ("classifier", "feature_groups", "threshold", "target_fpr", "per_attack",
                                            "fit_images", "fit_seconds", "weights") if k in info}, indent=2))
    return 0


def _eval_config(args: argparse.Namespace):
    from .evaluation import EvalConfig

    cfg = dataclass_from_args(EvalConfig, args)
    if not cfg.bundle:
        cfg.bundle = _default_bundle()
    return cfg


def _parse_shard(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    try:
        shard, total = int(i), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r} must look like I/N, e.g. 0/4") from None
    if total < 1 or not 0 <= shard < total:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= I < N")
    return shard, total


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import merge, run, run_shard

    if not args.out:
        raise ValueError("--out DIR is required")
    out = Path(args.out)
    if getattr(args, "merge", False):
        given = any(getattr(args, k, None) is not None for k in ("bundle", "attacks", "n", "n_fit", "seed"))
        report = merge(out, _eval_config(args) if given else None, progress=not args.quiet)
    elif args.shard is not None:
        path = run_shard(_eval_config(args), *args.shard, out, progress=not args.quiet)
        print(f"wrote {path}")
        return 0
    else:
        report = run(_eval_config(args), out, progress=not args.quiet)
    print((out / "report.md").read_text() if not args.json else json.dumps(report["results"], indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .evaluation import EvalConfig
    from .interpret.cli import register as register_explain

    register_explain(sub, _default_bundle())

    p = sub.add_parser("attack", help="attack correctly classified images of a bundle's dataset; save as .npz")
    p.add_argument("--bundle", default=_default_bundle())
    p.add_argument("--attack", required=True, help="fgsm, bim, pgd, pgdl2, cw, deepfool, apgd; "
                   "parameters as pgd:eps=0.05,steps=40")
    p.add_argument("--eps", type=float, help="budget in [0, 1] pixel space (Linf) or L2 norm")
    p.add_argument("--steps", type=int)
    p.add_argument("--c", type=float, help="CW's confidence weight")
    p.add_argument("--n", type=int, default=1000, help="number of images")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--data-root")
    p.add_argument("--out", required=True, help=".npz file to write")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_attack)

    p = sub.add_parser("fit-detector", help="compute class prototypes and fit the bundle's path detector")
    p.add_argument("--bundle", default=_default_bundle())
    p.add_argument("--attacks", default="fgsm,pgd,pgdl2,cw,deepfool,square",
                   help="attacks on validation images: what the ensemble's weights are chosen on (worst family), "
                   "or what a supervised classifier learns from")
    p.add_argument("--classifier", default="ensemble", choices=("ensemble", "logreg", "rf", "gb"),
                   help="ensemble: clean-only path scores combined with non-negative weights (default)")
    p.add_argument("--n-reference", type=int, default=20000,
                   help="clean training images the ensemble's clean-only components are fitted on")
    p.add_argument("--features", default="soft,hard,density,proto,confidence", help="feature groups")
    p.add_argument("--n-fit", type=int, default=1000, help="validation images to attack for fitting")
    p.add_argument("--n-calibration", type=int, default=1000, help="clean validation images for the threshold")
    p.add_argument("--target-fpr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root")
    p.add_argument("--cache-dir", help="reuse attacks computed before")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_fit_detector)

    p = sub.add_parser("evaluate", help="offline attack-evaluation suite; `evaluate merge` joins shards",
                       description="Attack test images, fit and calibrate every detector, and write report.json, "
                       "report.md and figures to --out. With --shard I/N only the adversarial images of shard I are "
                       "computed; `pathguard evaluate merge --out DIR` then writes the report.")
    p.add_argument("--out", help="output directory (required)")
    p.add_argument("--shard", type=_parse_shard, help="I/N: compute shard I (0-based) of N and stop")
    p.add_argument("--json", action="store_true", help="print results as JSON instead of the Markdown report")
    p.add_argument("--quiet", action="store_true")
    add_dataclass_arguments(p, EvalConfig)
    p.set_defaults(func=_cmd_evaluate, merge=False)
    msub = p.add_subparsers(dest="evaluate_command")
    m = msub.add_parser("merge", help="merge DIR/shards/* into the report a single run writes")
    m.add_argument("--out", required=True)
    m.add_argument("--json", action="store_true")
    m.add_argument("--quiet", action="store_true")
    add_dataclass_arguments(m, EvalConfig)
    m.set_defaults(func=_cmd_evaluate, merge=True, shard=None)

    from .adaptive.cli import register as register_adaptive

    register_adaptive(sub)
