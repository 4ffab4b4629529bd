"""What every offline report (``evaluate``, ``adaptive``) starts with, and how it is written."""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .bundle import Bundle


def report_header(bundle: Bundle, bundle_path: str | Path, config: dict) -> dict:
    """The first keys of ``report.json``: PathGuard's version, the run's config and the bundle it ran on."""
    return {
        "pathguard_version": __version__,
        "config": config,
        "bundle": {
            "path": str(bundle_path),
            "name": bundle.name,
            "arch": bundle.meta["arch"],
            "model_sha256": bundle.model_digest,
        },
    }


def bundle_sentence(report: dict) -> str:
    """``Bundle `PATH` (ARCH, weights SHA-256 `...`)``, the opening of every ``report.md``."""
    b = report["bundle"]
    return f"Bundle `{b['path']}` ({b['arch']}, weights SHA-256 `{b['model_sha256'][:16]}`)"


def write_json_and_markdown(out: Path, report: dict, markdown: str) -> None:
    """``out/report.json`` and ``out/report.md``."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown)
