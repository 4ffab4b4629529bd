"""``pathguard``: the command line. Each subcommand parses its flags inside :func:`main`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .cli_args import add_dataclass_arguments, dataclass_from_args

DEFAULT_BUNDLE = str(Path(__file__).resolve().parent.parent / "models" / "default")


def default_bundle() -> str:
    """``PATHGUARD_BUNDLE`` when set (as in the container image), else the repository's models/default."""
    return os.environ.get("PATHGUARD_BUNDLE") or DEFAULT_BUNDLE


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    base = None
    if args.config:
        base = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
    cfg = dataclass_from_args(TrainConfig, args, base=base)
    metrics = train(cfg, args.out, progress=not args.quiet)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .bundle import load_bundle
    from .describe import describe_bundle

    bundle = load_bundle(args.bundle or default_bundle())
    print(json.dumps(bundle.meta, indent=2) if args.json else describe_bundle(bundle))
    return 0


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from .data import fetch_fashion_mnist

    print(fetch_fashion_mnist(Path(args.data_root) if args.data_root else None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .training import TrainConfig

    parser = argparse.ArgumentParser(prog="pathguard", description="Screen images for adversarial inputs "
                                     "by the calculation paths of a decoupled CNN.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a decoupled (or dense) model into a bundle directory")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_arguments(p, TrainConfig)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("info", help="describe a bundle")
    p.add_argument("bundle", nargs="?", default=None,
                   help="bundle directory (default: $PATHGUARD_BUNDLE or models/default)")
    p.add_argument("--json", action="store_true", help="print bundle.json as is")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("data", help="dataset utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="make Fashion-MNIST available (Debian package or upstream download)")
    f.add_argument("--data-root", help="folder to look in or download to")
    f.set_defaults(func=_cmd_data_fetch)

    from service import cli as service_cli

    from . import commands

    commands.register(sub)
    service_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .bundle import BundleError
    from .data import DatasetNotFound

    try:
        return args.func(args)
    except (BundleError, DatasetNotFound, ValueError) as exc:
        print(f"pathguard {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
