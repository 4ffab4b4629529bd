"""``pathguard serve`` and ``pathguard screen`` (registered into the main CLI)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    pass
