"""The query-only attacker against a bundle, per score policy: ``pathguard adaptive --query-budget Q``.

For each score policy and each budget eps, :class:`~detector.adaptive.query.SquareQueryAttack` runs in process
against the screening function and disclosure the server answers from (``Screener`` with the server's
default engine). Success at eps is the union over the budgets <= eps (an image found at eps 0.03 is also found
at 0.05); its query count is the smallest among those budgets, and an image already found at a smaller budget
is not attacked again. Writes ``query.json``, ``query.md`` and ``query_success.png`` to the output folder.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..bundle import load_bundle
from ..disclosure import ROUND_STEP, SCORE_POLICIES
from ..reporting import report_header
from ..splits import bundle_splits, correctly_classified
from .query import INITS, ScreenerOracle, SquareQueryAttack

log = logging.getLogger(__name__)
ENGINE = "skipping"  # the server's default engine (pathguard serve --engine)


@dataclass
class QueryConfig:
    """The query-only attacker of ``pathguard adaptive`` (off unless ``query_budget`` > 0)."""

    query_budget: int = field(default=0, metadata={"help": "queries per image of the query-only attacker (0: off)"})
    query_policies: tuple[str, ...] = field(
        default=SCORE_POLICIES, metadata={"help": "score policies the query-only attacker faces"}
    )
    query_n: int = field(default=100, metadata={"help": "test images the query-only attacker attacks"})
    query_only: bool = field(
        default=False, metadata={"help": "run only the query-only attacker (no white-box rounds)", "switch": True}
    )
    query_lam: float = field(default=1.0, metadata={"help": "weight of the detector term of the query loss"})
    query_kappa: float = field(default=2.0, metadata={"help": "classifier margin the query loss stops at"})
    query_init: str = field(default="stripes", metadata={"help": "starting point", "choices": INITS})

    def __post_init__(self) -> None:
        self.query_policies = tuple(self.query_policies)
        if self.query_budget < 0 or self.query_n < 1:
            raise ValueError(f"query_budget={self.query_budget} must be >= 0 and query_n={self.query_n} >= 1")
        if self.query_only and not self.query_budget:
            raise ValueError("query_only needs query_budget > 0")
        bad = set(self.query_policies) - set(SCORE_POLICIES)
        if bad or not self.query_policies:
            raise ValueError(
                f"query_policies={list(self.query_policies)} must be a non-empty subset of {SCORE_POLICIES}"
            )


def checkpoints(budget: int) -> list[int]:
    return [q for q in (10, 30, 100, 300, 1000, 3000, 10000) if q < budget] + [budget]


def union_over_budgets(eps: list[float], success: dict, queries: dict) -> tuple[dict, dict]:
    """Per eps: success at any budget <= eps, and the fewest queries that found it (inf where none did)."""
    found, spent = {}, {}
    done = None
    cost = None
    for e in sorted(eps):
        q = np.where(success[e], queries[e], np.inf)
        done = success[e] if done is None else done | success[e]
        cost = q if cost is None else np.minimum(cost, q)
        found[e], spent[e] = done.copy(), cost.copy()
    return found, spent


def _attack_policy(screener, policy: str, cfg: QueryConfig, eps: list[float], x, y, seed: int) -> dict:
    """One policy at every budget (smallest first); the per-eps rows of the report."""
    oracle = ScreenerOracle(screener, policy)
    success, queries, rows = {}, {}, {}
    found = np.zeros(len(y), dtype=bool)
    for e in sorted(eps):
        todo = np.flatnonzero(~found)
        s, q = np.zeros(len(y), dtype=bool), np.zeros(len(y), dtype=np.int64)
        attack = SquareQueryAttack(
            oracle, eps=e, budget=cfg.query_budget, lam=cfg.query_lam, kappa=cfg.query_kappa, init=cfg.query_init
        )
        t0 = time.perf_counter()
        if len(todo):
            res = attack(x[todo], y[todo], seed=seed, ids=todo)
            s[todo], q[todo] = res.success, res.queries
        success[e], queries[e] = s, q
        found |= s
        rows[e] = {
            "attacked": int(len(todo)),
            "queries_spent": int(q.sum()),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        log.info("query attack, policy %s, eps %g: %d of %d attacked images found", policy, e, s.sum(), len(todo))
    union, cost = union_over_budgets(eps, success, queries)
    out = {}
    for e in sorted(eps):
        hit = cost[e][np.isfinite(cost[e])]
        out[str(e)] = {
            "success": float(union[e].mean()),
            "success_within": {str(c): float((cost[e] <= c).mean()) for c in checkpoints(cfg.query_budget)},
            "median_queries_of_successes": float(np.median(hit)) if len(hit) else None,
            **rows[e],
        }
    return out


def run_query(
    bundle_path: str,
    cfg: QueryConfig,
    out: Path,
    *,
    eps: tuple[float, ...],
    seed: int = 0,
    data_root: str | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Attack ``cfg.query_n`` correctly classified test images under each policy; write query.json/.md/.png."""
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_path, device=torch.device(device))
    screener = bundle.screener(engine=ENGINE)
    splits = bundle_splits(bundle.meta, data_root)
    idx = correctly_classified(bundle.model, splits.test, cfg.query_n, seed=seed)
    x, y = splits.test.float_images(idx), splits.test.labels[idx]
    clean = screener.screen(x)
    policies = {p: _attack_policy(screener, p, cfg, list(eps), x, y, seed) for p in cfg.query_policies}
    report = {
        **report_header(bundle, bundle_path, {**asdict(cfg), "eps": list(eps), "seed": seed}),
        "attacker": SquareQueryAttack(
            screener,
            eps=max(eps),
            budget=cfg.query_budget,
            lam=cfg.query_lam,
            kappa=cfg.query_kappa,
            init=cfg.query_init,
        ).describe(),
        "engine": ENGINE,
        "round_step": ROUND_STEP,
        "threshold": screener.threshold,
        "images": {"set": splits.test.name, "n": len(idx), "seed": seed, "indices": idx.tolist()},
        "clean_flagged": float(clean.flags.mean()),
        "policies": policies,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "query.json").write_text(json.dumps(report, indent=2) + "\n")
    report["plot"] = _plot(out, report)
    (out / "query.md").write_text(render_markdown(report))
    return report


def render_markdown(r: dict) -> str:
    cfg = r["config"]
    cps = checkpoints(cfg["query_budget"])
    lines = [
        "# PathGuard query-only attack report",
        "",
        f"Bundle `{r['bundle']['path']}` ({r['bundle']['arch']}); {r['images']['n']} correctly classified images of "
        f"`{r['images']['set']}` (seed {r['images']['seed']}; {100 * r['clean_flagged']:.1f}% of them flagged clean).",
        "",
        "The attacker sees only what the server answers under each score policy (full: probabilities, score and "
        f"threshold; rounded: the same on a {r['round_step']} grid; flag: the predicted class and the flag) and runs "
        f"a Square-style Linf random search with at most {cfg['query_budget']} queries per image "
        f"(loss max(margin, -{cfg['query_kappa']:g}) + {cfg['query_lam']:g} x detector excess; start: "
        f"{cfg['query_init']}). Success: misclassified **and** not flagged, as the server answers; at eps, any budget "
        "<= eps counts (union).",
        "",
        "| policy | eps | success | " + " | ".join(f"<= {c} queries" for c in cps) + " | median queries (successes) |",
        "|---|---|---|" + "---|" * len(cps) + "---|",
    ]
    for policy, per in r["policies"].items():
        for e, row in per.items():
            med = row["median_queries_of_successes"]
            lines.append(
                f"| {policy} | {e} | **{100 * row['success']:.1f}%** | "
                + " | ".join(f"{100 * row['success_within'][str(c)]:.1f}%" for c in cps)
                + f" | {'–' if med is None else f'{med:.0f}'} |"
            )
    lines += ["", f"Took {r['seconds'] / 60:.1f} min.", ""]
    if r.get("plot"):
        lines += [f"![{r['plot']}]({r['plot']})", ""]
    return "\n".join(lines)


def _plot(out: Path, r: dict) -> str:
    import matplotlib.pyplot as plt

    eps = list(next(iter(r["policies"].values())))
    cps = checkpoints(r["config"]["query_budget"])
    fig, axes = plt.subplots(1, len(eps), figsize=(4.6 * len(eps), 3.6), squeeze=False, sharey=True)
    for ax, e in zip(axes[0], eps, strict=True):
        for policy, per in r["policies"].items():
            ax.plot(cps, [per[e]["success_within"][str(c)] for c in cps], marker="o", label=policy)
        ax.set(
            title=f"eps {e}",
            xlabel="queries per image",
            xscale="log",
            ylabel="misclassified, not flagged",
            ylim=(-0.02, 1.02),
        )
        ax.legend(fontsize=7, title="score policy")
    name = "query_success.png"
    fig.savefig(out / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name
