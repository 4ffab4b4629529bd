"""``pathguard adaptive``: adaptive white-box attacks on a bundle's classifier + path detector."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from detector.adaptive.experiment import AdaptiveConfig
from detector.adaptive.query_eval import QueryConfig
from detector.bundle import default_bundle

from .options import add_command, config_from, opt, required, switch


@dataclass
class AdaptiveRun:
    """How this run executes and reports (what it computes is :class:`AdaptiveConfig`)."""

    out: str = required("output directory")
    device: str = opt("cpu", "cpu, cuda or auto")
    threads: int = opt(0, "torch CPU threads (0: the CPU quota)")
    json: bool = switch("print the summaries as JSON instead of the report")
    quiet: bool = switch("no progress bars")


def _cmd_adaptive(args: argparse.Namespace) -> int:
    from detector.adaptive.experiment import run_adaptive
    from detector.runtime import select_device, set_threads

    cfg = config_from(AdaptiveConfig, args)
    cfg.bundle = cfg.bundle or default_bundle()  # PATHGUARD_BUNDLE was read by config_from already
    run = config_from(AdaptiveRun, args)
    set_threads(run.threads)
    out = Path(run.out)
    query = config_from(QueryConfig, args)
    if query.query_budget:
        _query_attack(cfg, query, out, select_device(run.device), run.json)
        if query.query_only:
            return 0
    report = run_adaptive(cfg, out, device=select_device(run.device), progress=not run.quiet)
    if run.json:
        print(
            json.dumps(
                {
                    "headline": report["headline"],
                    "rounds": [{"name": r["name"], "summary": r["summary"]} for r in report["rounds"]],
                },
                indent=2,
            )
        )
    else:
        print((out / "report.md").read_text())
    return 0


def _query_attack(cfg: AdaptiveConfig, query: QueryConfig, out: Path, device, as_json: bool) -> None:
    """The query-only attacker per score policy: query.json, query.md, query_success.png in ``out``."""
    from detector.adaptive.query_eval import run_query

    report = run_query(cfg.bundle, query, out, eps=cfg.eps, seed=cfg.seed, data_root=cfg.data_root, device=device)
    print(json.dumps(report["policies"], indent=2) if as_json else (out / "query.md").read_text())


def register(sub: argparse._SubParsersAction) -> None:
    add_command(
        sub,
        "adaptive",
        _cmd_adaptive,
        AdaptiveConfig,
        AdaptiveRun,
        QueryConfig,
        help="adaptive white-box attacks on classifier + path detector, and hardening",
        description="Attack correctly classified test images with attacks that know the detector "
        "(detector-aware PGD, path mimicry) over a sweep of budgets and lambdas; refit the detector "
        "with adaptive examples made on validation images and attack it again. Writes report.json, "
        "report.md and figures to --out. Prints a cost estimate first. With --query-budget Q, also a query-only "
        "attacker (Square-style random search on what the server answers) per score policy: query.json, query.md.",
    )
