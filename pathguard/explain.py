"""``pathguard explain``: path-level pictures of a bundle (flags from :class:`ExplainConfig`)."""

from __future__ import annotations

import argparse
import json

from detector.bundle import default_bundle
from detector.interpret.explainer import ExplainConfig

from .options import add_command, config_from


def _cmd_explain(args: argparse.Namespace) -> int:
    from detector.interpret.explainer import explain

    cfg = config_from(ExplainConfig, args)
    cfg.bundle = cfg.bundle or default_bundle()
    index = explain(cfg)
    print(
        json.dumps(
            {
                "out": cfg.out,
                "report": f"{cfg.out}/report.md",
                "layers": len(index["layers"]),
                "inputs": len(index["inputs"]),
                "similarity": index["similarity_summary"]["most_similar"][:3],
                "specificity": {k: v for k, v in index["specificity_summary"].items() if k != "specific_per_class"},
            },
            indent=2,
        )
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    add_command(
        sub,
        "explain",
        _cmd_explain,
        ExplainConfig,
        help="path-level pictures: per-class filter usage, class similarity, "
        "class-specific filters, single inputs against their prototype",
        description="Write per-class filter-usage heatmaps of every gated layer, the class-to-class "
        "path similarity matrix, class-specific vs shared filters, and chosen inputs' paths against "
        "their predicted class's prototype to --out, as PNG + JSON, with report.md tying them together.",
    )
