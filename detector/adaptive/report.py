"""``report.json``, ``report.md`` and figures of an adaptive evaluation."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..reporting import bundle_sentence, write_json_and_markdown
from .base import GOAL_EPS

NAMES = {
    "pgd": "plain PGD (reference)",
    "selective": "selective / orthogonal PGD",
    "transfer-logreg": "transfer from logistic regression",
    "detector-pgd": "weighted-sum detector-aware PGD",
    "mimicry": "path mimicry",
    "any": "any of them",
}


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def write_report(out: Path, report: dict, rounds=None) -> None:
    """Write report.json and report.md (and figures, when ``rounds`` holds the per-image results)."""
    if rounds is not None:
        report["plots"] = write_plots(out, report, rounds)
    write_json_and_markdown(out, report, render_markdown(report))


# Over 60 lines on purpose: one Markdown page written top to bottom in the order it reads; split, its
# sections would lose their order and share half a dozen locals.
def render_markdown(r: dict) -> str:
    cfg, det, h = r["config"], r["detector"], r["headline"]
    rounds = r["rounds"]
    fpr = det["target_fpr"]
    step_eps = cfg.get("step_eps", max(cfg["eps"]))  # reports before step_eps scaled steps with eps itself
    lines = [
        "# PathGuard adaptive-attack report",
        "",
        *_sanity_lines(rounds),
        "",
        f"{bundle_sentence(r)}; path detector: {det['classifier']} on "
        f"{', '.join(det['feature_groups'])}, threshold calibrated at {_pct(fpr)} FPR on clean validation images.",
        "",
        "## Headline",
        "",
        f"At eps {h['eps']} (Linf, [0, 1] pixels), an attacker who knows the model and the detector and tries every "
        "attack and lambda below, at every budget up to eps, fools classifier + detector on "
        + "; ".join(
            f"**{_pct(h[x['name']])}** of the images against the {x['name']} detector (the classifier alone "
            f"on {_pct(h[x['name'] + '_classifier_alone'])})"
            for x in rounds
        )
        + f". Goal (fewer than half, against the {'hardened' if len(rounds) > 1 else 'shipped'} detector): "
        + ("met." if h["under_half"] else "**not met**.")
        + (
            ""
            if h["eps"] == GOAL_EPS
            else f" (eps {GOAL_EPS} was not in this run; this is the largest budget that was.)"
        ),
        "",
        "## Threat model of this run",
        "",
        "- White-box attacker: knows the weights, the gates, the class prototypes, the detector and its threshold; "
        "sends float images in [0, 1] within an Linf ball of radius eps around a correctly classified test image.",
        "- Success against the classifier: the prediction differs from the true label. Success against "
        "classifier + detector: misclassified **and** the detector's score is at or below its calibrated threshold.",
        "- Success at eps counts an image if the attack found a successful example at any budget <= eps (the "
        "union over budgets); the tables also give each budget alone.",
        "- Gradients pass the hard gates by straight-through estimation. Each image keeps its first iterate that "
        "the *real* pipeline judges successful and stops there.",
        f"- selective / orthogonal PGD (Bryniarski et al. 2022): {cfg['steps']} steps per restart, "
        f"{cfg['restarts']} restart(s) for images not yet through (modes {', '.join(cfg['modes'])}, cycled), the "
        f"first from the clean image, later ones from a ball of radius {cfg['start_radius']:g} e; step size "
        f"cosine from e/4 to e/200, where e = min(eps, {step_eps:g}); at a budget above {step_eps:g}, the same "
        "restarts again with e = eps for the images still not through. Each step works on the objective the real "
        f"pipeline says is unmet: the classifier margin until misclassified by kappa = {cfg['kappa']:g}, else the "
        "detector's logit while the real detector flags the input; orthogonal mode removes from the step its "
        "component along the other objective's gradient. " + _surrogate_sentence(det["surrogate"]),
        f"- path mimicry: towards the {cfg['mimicry_target']} class, plus lambda x squared distance between the soft "
        "path and that class's mean soft path (prototype); its gradients ignore the detector; random start in "
        "the ball of radius e, step 2.5 e / steps (above that budget, a second pass with e = eps for the images "
        "left).",
        "- plain PGD: torchattacks PGD on cross-entropy, same budget and steps, step 2.5 eps / steps, random "
        "start (the kind of attack the detector was fitted on).",
        *(
            [
                "- transfer from logistic regression: selective PGD against a logistic-regression path detector "
                "fitted on the shipped detector's training rows (exact gradient), scored by the real detector."
            ]
            if det.get("transfer_twin")
            else []
        ),
        "",
        "## Images",
        "",
        f"- Evaluation: {r['images']['eval']['n']} correctly classified images of `{r['images']['eval']['set']}` "
        "(never used to fit or calibrate a detector); seed and indices in report.json.",
    ]
    if r.get("hardening"):
        hi = r["hardening"]["images"]
        lines.append(f"- Hardening examples: {hi['n']} images of `{hi['set']}` ({hi['what']}).")
    for rd in rounds:
        lines += [
            "",
            f"## Round: {rd['name']} detector (threshold {rd['threshold']:.4g}; clean test images flagged "
            f"{_pct(rd['clean_fpr'])})",
            "",
            "Per budget, each attack at its best over lambda (an image counts if any lambda succeeds); the last "
            "success column counts every image the attack got through at any budget <= eps:",
            "",
            "| eps | attack | fools classifier | fools classifier + detector, this eps | "
            "fools classifier + detector, any budget <= eps | lowest AUROC |",
            "|---|---|---|---|---|---|",
        ]
        for eps, per in rd["summary"].items():
            for attack, s in per.items():
                lines.append(
                    f"| {eps} | {NAMES.get(attack, attack)} | {_pct(s['success_classifier'])} | "
                    f"{_pct(s['success_pipeline'])} | {_pct(s.get('success_upto'))} | {_f(s['min_auroc'])} |"
                )
        sc = rd.get("sanity")
        if sc:
            lines += ["", f"Sanity checks (tolerance {_pct(sc['tolerance'])}):", ""]
            lines += [f"- {'pass' if c['passed'] else '**FAIL**'}: {c['name']} ({c['detail']})" for c in sc["checks"]]
        lines += [
            "",
            "Every run (AUROC: clean test images vs misclassified adversarial ones; TPR at the calibrated threshold):",
            "",
            "| attack | eps | lambda | fools classifier | fools classifier + detector | AUROC | TPR | "
            "median score | max Linf | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rd["rows"]:
            lines.append(_row(row))
        if rd.get("transfer"):
            lines += [
                "",
                "Round-1 adaptive examples (made against the shipped detector), scored by the hardened one:",
                "",
                "| attack | eps | lambda | fools classifier | fools classifier + detector | AUROC | TPR | "
                "median score | max Linf | seconds |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for row in rd["transfer"]:
                lines.append(_row(row))
    if r.get("hardening"):
        hd = r["hardening"]
        lines += [
            "",
            "## Hardening",
            "",
            f"The detector was refitted on its original {hd['base_rows']['n_rows']} rows "
            f"({hd['base_rows']['n_adversarial']} adversarial, from {', '.join(hd['base_rows']['attacks'])}) "
            f"plus {hd['adaptive_rows']} successful adaptive examples, and recalibrated on the same clean "
            f"validation images (threshold {hd['threshold_before']:.4g} -> {hd['threshold_after']:.4g}). "
            f"It took {hd['seconds']:.0f} s." + (f" Saved to `{hd['saved_to']}`." if hd.get("saved_to") else ""),
        ]
    c = r["cost"]
    lines += [
        "",
        "## Cost",
        "",
        f"{_f(1000 * c['seconds_per_image_step'], 2)} ms per image and adaptive step on {r['device']} "
        f"({r['threads']} threads); upper bound estimated before the run {c['total_upper_bound'] / 60:.0f} min, "
        f"actual {c['total_seconds'] / 60:.1f} min.",
        "",
        "## Caveats",
        "",
        "- These are lower bounds on what an attacker achieves: more steps, restarts, other losses or other "
        "lambdas may do better. A number here is not a guarantee.",
        "- Images are sent as floats; an attacker restricted to 8-bit images would have to round them (not "
        "measured here).",
        "- The clean false-positive rate on the evaluation images can differ from the calibration target; it "
        "is reported per round.",
        "",
    ]
    if r.get("plots"):
        lines += ["## Figures", ""] + [f"![{p}]({p})" for p in r["plots"]] + [""]
    return "\n".join(lines)


def _sanity_lines(rounds: list[dict]) -> list[str]:
    """The report's first lines: whether every round passed its sanity checks, and which failed."""
    failed = [(rd["name"], c) for rd in rounds for c in rd.get("sanity", {}).get("checks", []) if not c["passed"]]
    if not failed:
        n = sum(len(rd.get("sanity", {}).get("checks", [])) for rd in rounds)
        return [
            f"**Sanity checks: all {n} passed** (see each round). The attack shows none of the signatures of a "
            "broken attack that they test."
        ]
    return [
        f"**Sanity checks FAILED ({len(failed)}): the success figures below may measure a weak attack rather than "
        "the defence.**",
        "",
        *(f"- {name} detector: {c['name']}: {c['detail']}" for name, c in failed),
    ]


def _surrogate_sentence(sur: dict) -> str:
    if sur.get("exact") and "relaxation" not in sur:
        how = "the detector's exact gradient"
    elif "relaxation" in sur:
        how = f"a smooth relaxation built from the detector's parameters ({sur['relaxation']})"
    else:
        how = "a network refitted on the attack's own iterates, labelled by the real detector's scores"
    return (
        f"Detector gradient: {how}; on clean, plain-PGD and selective-PGD test rows it ranks like the real score "
        f"with Spearman {_f(sur.get('spearman_eval_rows'))} and puts "
        f"{_pct(sur.get('same_decision_eval_rows'))} of them on the same side of the threshold."
    )


def _row(row: dict) -> str:
    lam = "–" if row["lambda"] is None else f"{row['lambda']:g}"
    return (
        f"| {NAMES.get(row['attack'], row['attack'])} | {row['eps']:g} | {lam} | "
        f"{_pct(row['success_classifier'])} | {_pct(row['success_pipeline'])} | {_f(row['auroc'])} | "
        f"{_pct(row['tpr_at_threshold'])} | {_f(row['median_score'], 4)} | {_f(row['max_linf'], 4)} | "
        f"{_f(row['seconds'], 1)} |"
    )


def write_plots(out: Path, report: dict, rounds) -> list[str]:
    """adaptive_success.png: success against classifier + detector by budget, per round; adaptive_scores.png:
    detector scores of clean, plain-PGD and adaptive images at the largest budget, per round."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    fig, axes = plt.subplots(1, len(rounds), figsize=(5.2 * len(rounds), 4), squeeze=False, sharey=True)
    for ax, rd, summ in zip(axes[0], rounds, report["rounds"], strict=True):
        eps = [float(e) for e in summ["summary"]]
        for attack in next(iter(summ["summary"].values())):
            ys = [summ["summary"][str(e)][attack]["success_upto"] for e in eps]
            if attack == "any":  # drawn wide and faint underneath, so that the attack it equals stays visible
                ax.plot(eps, ys, marker="o", label=NAMES[attack], lw=5, c="k", alpha=0.25, zorder=1)
            else:
                ax.plot(eps, ys, marker="o", label=NAMES.get(attack, attack), lw=1.5, zorder=2)
        clf = [summ["summary"][str(e)]["any"]["success_classifier"] for e in eps]
        ax.plot(eps, clf, ls="--", c="grey", label="classifier alone (any attack)")
        ax.axhline(0.5, c="red", ls=":", lw=1)
        ax.set(
            title=f"{rd.name} detector",
            xlabel="eps (Linf, [0, 1] pixels)",
            ylabel="fools classifier + detector (any budget <= eps)",
            ylim=(-0.02, 1.02),
        )
        ax.legend(fontsize=7)
    name = "adaptive_success.png"
    fig.savefig(out / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    files.append(name)

    top = max(report["config"]["eps"])
    fig, axes = plt.subplots(1, len(rounds), figsize=(5.2 * len(rounds), 3.6), squeeze=False)
    for ax, rd in zip(axes[0], rounds, strict=True):
        bins = np.linspace(0, 1, 41)
        ax.hist(rd.clean_scores, bins=bins, alpha=0.5, density=True, label="clean")
        for attack in ("pgd", *report["config"]["attacks"]):
            keys = [k for k in rd.scores if k[0] == attack and k[1] == top]
            if not keys:
                continue
            s = np.concatenate([rd.scores[k][rd.wrong[k]] for k in keys])
            if len(s):
                ax.hist(s, bins=bins, alpha=0.5, density=True, label=f"{NAMES[attack]} (misclassified)")
        ax.axvline(rd.pipeline.threshold, c="k", ls="--", lw=1, label="threshold")
        ax.set(title=f"{rd.name} detector, eps {top}", xlabel="adversarial score", yscale="log")
        ax.legend(fontsize=7)
    name = "adaptive_scores.png"
    fig.savefig(out / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    files.append(name)
    return files
