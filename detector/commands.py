"""Subcommands beyond training: registered here as the features that provide them land."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    pass
