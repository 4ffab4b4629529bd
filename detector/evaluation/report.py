"""``report.json`` and ``report.md`` of an evaluation run."""

from __future__ import annotations

from pathlib import Path

from ..reporting import bundle_sentence, write_json_and_markdown


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def write_report(out: Path, report: dict) -> None:
    write_json_and_markdown(out, report, render_markdown(report))


def render_markdown(r: dict) -> str:
    cfg, attacks, results = r["config"], list(r["attacks"]), r["results"]
    fpr = cfg["target_fpr"]
    lines = [
        "# PathGuard evaluation report", "",
        f"{bundle_sentence(r)}. Clean test accuracy {_pct(r['clean_accuracy'])} "
        f"on {r['clean_accuracy_n']} test images.", "",
        "## Images", "",
        f"- Evaluation: {r['images']['eval']['n']} correctly classified images of `{r['images']['eval']['set']}` "
        "(attacked and scored; none used in fitting).",
        f"- Fitting: {r['images']['fit']['n']} correctly classified images of `{r['images']['fit']['set']}` and "
        "their successful adversarial versions.",
        f"- Calibration: {r['images']['calibration']['n']} other clean images of "
        f"`{r['images']['calibration']['set']}`; each threshold is set there at {_pct(fpr)} FPR.",
        f"- Featurizer reference: {r['images']['reference']['n']} clean images of `{r['images']['reference']['set']}`.",
        f"- Seed {cfg['seed']}; exact indices are in report.json.", "",
        "## Attacks (on the evaluation images)", "",
        "| attack | parameters | success rate | mean L2 | mean Linf | seconds |", "|---|---|---|---|---|---|",
    ]
    for a, s in r["attacks"].items():
        params = ", ".join(f"{k}={v}" for k, v in s["params"].items())
        lines.append(f"| {a} | {params} | {_pct(s['success_rate'])} | {_f(s['mean_l2'])} | {_f(s['mean_linf'])} | "
                     f"{_f(r['timing']['attack_seconds'].get(a), 1)} |")
    for title, key in (("successful attacks only", None), ("all attacked images", "all")):
        lines += ["", f"## Detection, {title}: AUROC / TPR at {_pct(fpr)} FPR", "",
                  "| detector | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
        for det, per in results.items():
            cells = []
            for a in attacks:
                m = per[a] if key is None else per[a][key]
                cells.append(f"{_f(m['auroc'])} / {_pct(m['tpr_at_fpr'])}")
            lines.append(f"| {det} | " + " | ".join(cells) + " |")
    lines += ["", "Actual false-positive rate on the evaluation's clean images at each calibrated threshold: "
              + ", ".join(f"{d} {_pct(next(iter(per.values()))['fpr_at_threshold'])}" for d, per in results.items())
              + "."]
    if r.get("leave_one_attack_out"):
        lines += ["", "## Leave one attack out: AUROC on the attack held out of fitting", "",
                  "| detector | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
        for det, per in r["leave_one_attack_out"].items():
            lines.append(f"| {det} | " + " | ".join(_f(per[a]["auroc"]) for a in attacks) + " |")
    if r.get("ablation"):
        lines += ["", "## Which path features carry the signal (logistic regression, AUROC)", "",
                  "| features | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
        for v, per in r["ablation"].items():
            lines.append(f"| {v} | " + " | ".join(_f(per[a]["auroc"]) for a in attacks) + " |")
    lines += ["", "## Detector cost", "", "| detector | fit seconds | scoring cost per image (x one forward pass) |",
              "|---|---|---|"]
    for det, t in r["timing"]["detectors"].items():
        lines.append(f"| {det} | {_f(t['fit_seconds'], 1)} | {_f(t['score_cost_ratio'], 1)} |")
    lines += ["", f"Total time {_f(r['timing']['total_seconds'], 0)} s.", "",
              "## Caveat", "",
              "These detectors see the network's own features. An attacker who knows the detector and optimises "
              "against it too (Carlini & Wagner 2017; Tramer et al. 2020) can do much better than the attacks "
              "above; `pathguard adaptive` measures that attacker (README, Threat model).", ""]
    if r.get("plots"):
        lines += ["## Figures", ""] + [f"![{p}]({p})" for p in r["plots"]] + [""]
    return "\n".join(lines)
