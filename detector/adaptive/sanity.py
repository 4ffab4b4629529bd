"""Sanity checks of an adaptive evaluation: the signatures of a broken attack (Tramer et al. 2020, section 3).

An attack whose success falls as its budget grows, that stays short of (nearly) every image at a budget
large enough to change the class of any image, that does worse than attacks ignoring the detector, or that
does worse with more steps, measures its own weakness rather than the defence. Each check reads the
report's figures only, so a hand-made report with a decreasing curve fails it.

Figures, per round (``summary[eps][attack]``): ``success_pipeline`` is the fraction of images made
misclassified and unflagged by the attack at that budget alone; ``success_upto`` the fraction for which
it found such an example at *any* budget <= eps (per image, the union).
"""

from __future__ import annotations

LARGE_EPS = 0.3  # at this Linf budget in [0, 1] pixels an attack that works gets (nearly) everything through
LARGE_EPS_SUCCESS = 0.95


def tolerance(n: int) -> float:
    """Drops this small are read as noise: one image, and at least one percentage point."""
    return max(0.01, 1.0 / max(n, 1))


def _eps_sorted(summary: dict) -> list[str]:
    return sorted(summary, key=float)


def check_eps_monotone(summary: dict, aware: list[str], tol: float) -> dict:
    """Each detector-aware attack's success at a budget (alone, not the union) never falls as eps grows."""
    drops = []
    for attack in aware:
        prev = None
        for eps in _eps_sorted(summary):
            s = summary[eps].get(attack, {}).get("success_pipeline")
            if s is None:
                continue
            if prev is not None and s < prev[1] - tol:
                drops.append(f"{attack}: {100 * prev[1]:.1f}% at eps {prev[0]} -> {100 * s:.1f}% at eps {eps}")
            prev = (eps, s)
    return {
        "name": "success never decreases with eps",
        "passed": not drops,
        "detail": "; ".join(drops) or f"per-budget success of {', '.join(aware)} is non-decreasing in eps",
    }


def check_large_budget(summary: dict, aware: list[str]) -> dict:
    """At eps 0.3 the strongest detector-aware attack gets >= 95% of the images through."""
    name = f"reaches >= {100 * LARGE_EPS_SUCCESS:.0f}% at eps {LARGE_EPS}"
    key = next((e for e in summary if abs(float(e) - LARGE_EPS) < 1e-9), None)
    if key is None:
        return {"name": name, "passed": False, "detail": f"eps {LARGE_EPS} was not run"}
    best = max((summary[key].get(a, {}).get("success_upto") or 0.0) for a in aware)
    return {"name": name, "passed": best >= LARGE_EPS_SUCCESS, "detail": f"{100 * best:.1f}% at eps {LARGE_EPS}"}


def check_aware_strongest(summary: dict, aware: list[str], unaware: list[str], tol: float) -> dict:
    """At every budget the detector-aware attack does at least as well as each detector-unaware one."""
    worse = []
    for eps in _eps_sorted(summary):
        per = summary[eps]
        best = max((per.get(a, {}).get("success_upto") or 0.0) for a in aware)
        for u in unaware:
            s = per.get(u, {}).get("success_upto")
            if s is not None and best < s - tol:
                worse.append(f"eps {eps}: {100 * best:.1f}% < {u} {100 * s:.1f}%")
    return {
        "name": "detector-aware attack at least as strong as detector-unaware ones",
        "passed": not worse,
        "detail": "; ".join(worse) or f"{', '.join(aware)} >= {', '.join(unaware)} at every eps",
    }


def check_more_steps(steps_check: dict | None, tol: float) -> dict:
    """The same attack with fewer steps does not do better (``steps_check``: steps and success, ascending)."""
    name = "more steps never lowers success"
    if not steps_check:
        return {"name": name, "passed": False, "detail": "no fewer-steps run"}
    pairs = sorted(zip(steps_check["steps"], steps_check["success"], strict=True))
    drops = [
        f"{a} steps {100 * sa:.1f}% > {b} steps {100 * sb:.1f}%"
        for (a, sa), (b, sb) in zip(pairs, pairs[1:], strict=False)
        if sb < sa - tol
    ]
    detail = ", ".join(f"{s} steps {100 * v:.1f}%" for s, v in pairs) + f" at eps {steps_check['eps']}"
    return {"name": name, "passed": not drops, "detail": "; ".join(drops) or detail}


def sanity_checks(summary: dict, steps_check: dict | None, *, aware: list[str], unaware: list[str], n: int) -> dict:
    """The four checks of one round; ``passed`` is True only if all pass."""
    tol = tolerance(n)
    checks = [
        check_eps_monotone(summary, aware, tol),
        check_large_budget(summary, aware),
        check_aware_strongest(summary, aware, unaware, tol),
        check_more_steps(steps_check, tol),
    ]
    return {"passed": all(c["passed"] for c in checks), "tolerance": tol, "checks": checks}
