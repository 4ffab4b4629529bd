"""``pathguard``'s parser and entry point. Each subcommand parses its flags inside :func:`main`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import adaptive, explain, offline, serving, training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathguard",
        description="Screen images for adversarial inputs by the calculation paths of a decoupled CNN.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (offline, training, explain, adaptive, serving):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The command line only writes figures to files: no window system, whatever the environment offers. (The
    # plotting modules leave the backend to whoever owns the process.) Set through the environment, which
    # matplotlib reads when first imported: the server image has no matplotlib at all.
    os.environ["MPLBACKEND"] = "Agg"
    from detector.bundle import BundleError
    from detector.data import DatasetNotFound

    try:
        return args.func(args)
    except (BundleError, DatasetNotFound, ValueError) as exc:
        print(f"pathguard {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
