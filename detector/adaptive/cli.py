"""``pathguard adaptive``: adaptive white-box attacks on a bundle's classifier + path detector."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated numbers, e.g. 0.03,0.05,0.1") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _cmd_adaptive(args: argparse.Namespace) -> int:
    from ..runtime import select_device, set_threads
    from .experiment import AdaptiveConfig, run_adaptive

    if not args.bundle:
        from ..cli import DEFAULT_BUNDLE

        args.bundle = DEFAULT_BUNDLE
    cfg = AdaptiveConfig(bundle=args.bundle, n=args.n, eps=args.eps, lambdas=args.lambdas, attacks=args.attacks,
                         steps=args.steps, classifier_loss=args.classifier_loss, kappa=args.kappa,
                         balance=not args.no_balance, mimicry_target=args.mimicry_target, surrogate=args.surrogate,
                         harden=not args.no_harden, n_harden=args.n_harden, seed=args.seed,
                         batch_size=args.batch_size, data_root=args.data_root, cache_dir=args.cache_dir,
                         save_hardened=args.save_hardened, plots=not args.no_plots)
    set_threads(args.threads)
    out = Path(args.out)
    report = run_adaptive(cfg, out, device=select_device(args.device), progress=not args.quiet)
    if args.json:
        print(json.dumps({"headline": report["headline"], "rounds": [
            {"name": r["name"], "summary": r["summary"]} for r in report["rounds"]]}, indent=2))
    else:
        print((out / "report.md").read_text())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .experiment import AdaptiveConfig

    d = AdaptiveConfig()
    p = sub.add_parser("adaptive", help="adaptive white-box attacks on classifier + path detector, and hardening",
                       description="Attack correctly classified test images with attacks that know the detector "
                       "(detector-aware PGD, path mimicry) over a sweep of budgets and lambdas; refit the detector "
                       "with adaptive examples made on validation images and attack it again. Writes report.json, "
                       "report.md and figures to --out. Prints a cost estimate first.")
    p.add_argument("--bundle", default="", help="bundle directory (default: models/default)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=d.n, help=f"test images to attack (default: {d.n})")
    p.add_argument("--eps", type=_floats, default=d.eps, help="Linf budgets in [0, 1] pixels "
                   f"(default: {','.join(map(str, d.eps))})")
    p.add_argument("--lambdas", type=_floats, default=d.lambdas, help="weights of the evasion term "
                   f"(default: {','.join(map(str, d.lambdas))})")
    p.add_argument("--attacks", type=_names, default=d.attacks, help=f"default: {','.join(d.attacks)}")
    p.add_argument("--steps", type=int, default=d.steps, help=f"PGD steps of every attack (default: {d.steps})")
    p.add_argument("--classifier-loss", default=d.classifier_loss, choices=("margin", "ce"))
    p.add_argument("--kappa", type=float, default=d.kappa, help="margin of the hinge losses, logit units")
    p.add_argument("--no-balance", action="store_true", help="do not normalise the two gradients per image")
    p.add_argument("--mimicry-target", default=d.mimicry_target, help="'runner-up' or a class index")
    p.add_argument("--surrogate", default=d.surrogate, choices=("mlp", "linear"),
                   help="surrogate for tree-ensemble detectors")
    p.add_argument("--no-harden", action="store_true", help="skip hardening and the second round")
    p.add_argument("--n-harden", type=int, default=d.n_harden, help="validation images attacked for hardening "
                   f"(default: {d.n_harden})")
    p.add_argument("--save-hardened", metavar="DIR", help="write a copy of the bundle with the hardened detector")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--data-root")
    p.add_argument("--cache-dir", help="reuse the attacks that rebuild the detector's training rows")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the CPU quota)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON instead of the report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_adaptive)
