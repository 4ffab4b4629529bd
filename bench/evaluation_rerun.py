"""How long a ``pathguard evaluate`` run took and how far its figures land from a committed report.

Usage (a fresh run with an empty attack cache, then the comparison)::

    .venv/bin/pathguard evaluate --bundle models/default --out /tmp/rerun --cache-dir /tmp/empty-cache --threads 2
    .venv/bin/python -m bench.evaluation_rerun --rerun /tmp/rerun/report.json \\
        --committed reports/evaluation/report.json --json reports/evaluation/rerun_empty_cache.json

The attacks are computed again when the cache is empty; the comparison says how much that moves each
detector's AUROC and TPR at the threshold (every detector and attack both reports hold), and the rerun's own
timing (total and per stage) is the answer to "how long does the default evaluation take".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .helpers import emit_json


def compare(rerun: dict, committed: dict) -> dict:
    """Largest absolute change of AUROC and of TPR per detector, over the attacks both reports score."""
    out = {}
    for det, per in rerun["results"].items():
        old = committed["results"].get(det)
        if not old:
            continue
        attacks = [a for a in per if a in old and isinstance(per[a], dict) and "auroc" in per[a]]
        if attacks:
            out[det] = {
                "max_abs_auroc": max(abs(per[a]["auroc"] - old[a]["auroc"]) for a in attacks),
                "max_abs_tpr": max(abs(per[a]["tpr_at_fpr"] - old[a]["tpr_at_fpr"]) for a in attacks),
                "attacks": len(attacks),
            }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rerun", required=True, help="report.json of the new run")
    ap.add_argument("--committed", required=True, help="report.json to compare with")
    ap.add_argument("--json", help="file to write (printed either way)")
    args = ap.parse_args(argv)
    rerun, committed = (json.loads(Path(p).read_text()) for p in (args.rerun, args.committed))
    per_detector = compare(rerun, committed)
    timing = rerun.get("timing", {})
    emit_json(
        {
            "rerun_total_seconds": timing.get("total_seconds"),
            "rerun_attack_seconds": timing.get("attack_seconds"),
            "rerun_stages_seconds": timing.get("stages"),
            "rerun_config": rerun.get("config"),
            "max_abs_auroc_any_detector": max((d["max_abs_auroc"] for d in per_detector.values()), default=None),
            "max_abs_tpr_any_detector": max((d["max_abs_tpr"] for d in per_detector.values()), default=None),
            "per_detector": per_detector,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
