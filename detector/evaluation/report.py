"""``report.json`` and ``report.md`` of an evaluation run."""

from __future__ import annotations

from pathlib import Path

from ..detectors.ensemble import FIXED_RULE
from ..detectors.selection import selection_metric
from ..reporting import bundle_sentence, write_json_and_markdown


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def write_report(out: Path, report: dict) -> None:
    write_json_and_markdown(out, report, render_markdown(report))


def render_markdown(r: dict) -> str:
    attacks, fpr = list(r["attacks"]), r["config"]["target_fpr"]
    lines = _images_section(r, fpr)
    lines += _unseen_section(r, fpr)
    lines += _attacks_section(r)
    lines += _detectors_section(r)
    lines += _detection_sections(r, attacks, fpr)
    lines += _holdout_sections(r, attacks)
    lines += _baseline_notes(r)
    lines += _ablation_section(r, attacks)
    lines += _cost_section(r)
    if r.get("plots"):
        lines += ["## Figures", ""] + [f"![{p}]({p})" for p in r["plots"]] + [""]
    return "\n".join(lines)


def _images_section(r: dict, fpr: float) -> list[str]:
    """The title, the bundle and which images each part of the run used."""
    images = r["images"]
    return [
        "# PathGuard evaluation report",
        "",
        f"{bundle_sentence(r)}. Clean test accuracy {_pct(r['clean_accuracy'])} "
        f"on {r['clean_accuracy_n']} test images.",
        "",
        "## Images",
        "",
        f"- Evaluation: {images['eval']['n']} correctly classified images of `{images['eval']['set']}` "
        "(attacked and scored; none used in fitting).",
        f"- Fitting: {images['fit']['n']} correctly classified images of `{images['fit']['set']}` and "
        "their successful adversarial versions.",
        f"- Calibration: {images['calibration']['n']} other clean images of "
        f"`{images['calibration']['set']}`; each threshold is set there at {_pct(fpr)} FPR.",
        f"- Featurizer reference: {images['reference']['n']} clean images of `{images['reference']['set']}`.",
        f"- Seed {r['config']['seed']}; exact indices are in report.json.",
        "",
    ]


def _attacks_section(r: dict) -> list[str]:
    lines = [
        "## Attacks (on the evaluation images)",
        "",
        "| attack | family | parameters | success rate | mean L2 | mean Linf | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for a, s in r["attacks"].items():
        params = ", ".join(f"{k}={v}" for k, v in s["params"].items())
        lines.append(
            f"| {a} | {s.get('family', '–')} | {params} | {_pct(s['success_rate'])} | {_f(s['mean_l2'])} | "
            f"{_f(s['mean_linf'])} | {_f(r['timing']['attack_seconds'].get(a), 1)} |"
        )
    return lines


def _detectors_section(r: dict) -> list[str]:
    lines = [
        "",
        "## Detectors and what each was fitted on",
        "",
        "Clean-only detectors never see an adversarial example; the others' fitting sets are listed. Rows "
        "fitted on other images than the rest say so.",
        "",
        "| detector | fitted on | description |",
        "|---|---|---|",
    ]
    for det, info in r["detectors"].items():
        lines.append(f"| {det} | {info.get('fitting', {}).get('text', '–')} | {info['description']} |")
    return lines


def _detection_sections(r: dict, attacks: list[str], fpr: float) -> list[str]:
    """AUROC / TPR per detector and attack, on successful attacks and on all attacked images; the clean FPR."""
    results, lines = r["results"], []
    for title, key in (("successful attacks only", None), ("all attacked images", "all")):
        lines += [
            "",
            f"## Detection, {title}: AUROC / TPR at {_pct(fpr)} FPR",
            "",
            "Cells marked **u** are attacks the detector never saw in fitting (unseen); the rest were seen.",
            "",
            "| detector | " + " | ".join(attacks) + " |",
            "|---|" + "---|" * len(attacks),
        ]
        for det, per in results.items():
            cells = []
            for a in attacks:
                m = per[a] if key is None else per[a][key]
                mark = "" if per[a].get("seen", True) else " **u**"
                cells.append(f"{_f(m['auroc'])} / {_pct(m['tpr_at_fpr'])}{mark}")
            lines.append(f"| {det} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Actual false-positive rate on the evaluation's clean images at each calibrated threshold: "
        + ", ".join(f"{d} {_pct(next(iter(per.values()))['fpr_at_threshold'])}" for d, per in results.items())
        + ".",
    ]
    return lines


def _auroc_table(title: str, first: str, rows: dict, attacks: list[str]) -> list[str]:
    """A section with one table: a row per entry of ``rows`` ({name: {attack: {"auroc": ...}}}), a column per attack."""
    lines = ["", f"## {title}", "", f"| {first} | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for name, per in rows.items():
        lines.append(f"| {name} | " + " | ".join(_f(per[a]["auroc"]) for a in attacks) + " |")
    return lines


def _ablation_section(r: dict, attacks: list[str]) -> list[str]:
    if not r.get("ablation"):
        return []
    return _auroc_table(
        "Which path features carry the signal (logistic regression, AUROC)", "features", r["ablation"], attacks
    )


def _cost_section(r: dict) -> list[str]:
    """What each detector costs to fit and to score, the run's total time, and the caveat on adaptive attackers."""
    lines = [
        "",
        "## Detector cost",
        "",
        "Scoring cost: featurizing the evaluation's clean test images plus the detector's decision on every "
        "scored row, per image, over one plain forward pass of the same images (batch 500), both warm and timed "
        "side by side in the same process (of three paired rounds, the median ratio; one round for featurizers "
        "whose pass takes over 5 s).",
        "",
        "| detector | fit seconds | scoring cost per image (x one forward pass) |",
        "|---|---|---|",
    ]
    for det, t in r["timing"]["detectors"].items():
        lines.append(f"| {det} | {_f(t['fit_seconds'], 1)} | {_f(t['score_cost_ratio'], 2)} |")
    stages = r["timing"].get("stages", {})
    lines += [
        "",
        f"Total time {_f(r['timing']['total_seconds'], 0)} s"
        + (" (" + ", ".join(f"{k} {_f(v, 0)} s" for k, v in stages.items()) + ")." if stages else "."),
        "",
        "## Caveat",
        "",
        "These detectors see the network's own features. An attacker who knows the detector and optimises "
        "against it too (Carlini & Wagner 2017; Tramer et al. 2020) can do much better than the attacks "
        "above; `pathguard adaptive` measures that attacker (README, Threat model).",
        "",
    ]
    return lines


def _holdout_sections(r: dict, attacks: list[str]) -> list[str]:
    lines = []
    if r.get("leave_one_attack_out"):
        lines += _auroc_table(
            "Leave one attack out: AUROC on the attack held out of fitting",
            "detector",
            r["leave_one_attack_out"],
            attacks,
        )
    if r.get("leave_one_family_out"):
        fams = list(next(iter(r["leave_one_family_out"].values())))
        lines += [
            "",
            "## Leave one family out: AUROC / TPR on the attacks of the family held out of fitting",
            "",
            "| detector | " + " | ".join(f"{a} ({r['attacks'][a].get('family')})" for a in attacks) + " |",
            "|---|" + "---|" * len(attacks),
        ]
        for det, per in r["leave_one_family_out"].items():
            cells = {a: m for f in fams for a, m in per.get(f, {}).items()}
            lines.append(
                f"| {det} | "
                + " | ".join(
                    f"{_f(cells[a]['auroc'])} / {_pct(cells[a]['tpr_at_fpr'])}" if a in cells else "–" for a in attacks
                )
                + " |"
            )
    return lines


def _unseen_section(r: dict, fpr: float) -> list[str]:
    summary = r.get("unseen_summary") or {}
    if not summary:
        return []
    lines = [
        "## Unseen attacks first",
        "",
        "Per detector, the worst AUROC (successful attacks) and lowest TPR at "
        f"{_pct(fpr)} FPR over attacks it was never fitted on: clean-only detectors from the main table (every "
        "attack is unseen), the others from leave-one-family-out (fit without the family, score on it).",
        "",
        "| detector | worst unseen AUROC | on | lowest unseen TPR | from |",
        "|---|---|---|---|---|",
    ]
    for det, s in sorted(summary.items(), key=lambda kv: -kv[1]["worst_auroc"]):
        lines.append(
            f"| {det} | {_f(s['worst_auroc'])} | {s['worst_attack']} | {_pct(s['min_tpr_at_fpr'])} | {s['source']} |"
        )
    clean_fpr = {d: next(iter(per.values()))["fpr_at_threshold"] for d, per in r["results"].items()}
    lines += [
        "",
        "False-positive rate measured on the evaluation's clean test images at each calibrated threshold: "
        + ", ".join(f"{d} {_pct(v)}" for d, v in clean_fpr.items())
        + ".",
        "",
    ]
    return lines


BASELINE_NOTES = {
    "squeeze": "Feature squeezing (Xu et al. 2018): squeezers picked by detection (AUROC) on the validation fitting "
    "images among the bit depths 1-5 and 2x2/3x3 medians that keep 98% of clean predictions. Deviation: "
    "non-local means (their colour-image squeezer) is not a candidate; the images are grey.",
    "lid": "LID (Ma et al. 2018): k=20 over minibatches of 100, noisy negatives (Gaussian noise of each adversarial "
    "example's L2 norm) as in their recipe. Deviation: the minibatch is drawn from clean training images "
    "rather than the scored batch itself (at serving time there is no clean batch to compare with); LIDs are "
    "taken on pooled layer outputs, not flattened feature maps.",
    "kdbu": "KD+BU (Feinman et al. 2017): the model was trained without dropout, so the Bayesian-uncertainty half "
    "applies MC dropout (p=0.5, T=50) to the penultimate features at test time only; this is not the "
    "dropout-trained model their method assumes and can understate BU.",
    "mahalanobis": "Mahalanobis (Lee et al. 2018): per-stage scores with input pre-processing, magnitude chosen on "
    "the fitting images; logistic regression on the stage scores.",
}


def _baseline_notes(r: dict) -> list[str]:
    dets = r["detectors"]
    notes = [f"- **{d}**: {BASELINE_NOTES[d]}" for d in BASELINE_NOTES if d in dets]
    if "squeeze" in dets and dets["squeeze"].get("squeezers"):
        notes.append(
            f"- Squeezers picked in this run: {', '.join(dets['squeeze']['squeezers'])} (AUROC "
            f"{_f(dets['squeeze'].get('selection_auroc_on_fitting_rows'))} on the fitting rows)."
        )
    for d, info in dets.items():
        if info.get("weights"):
            w = ", ".join(f"{k} {v:g}" for k, v in info["weights"].items())
            sel = info.get("selection") or {}
            knn = (sel.get("knn_reference") or {}).get("chosen")
            if sel.get("rule") == FIXED_RULE:
                knn_note = (
                    f"; kNN reference {knn} paths per class, chosen on the validation fitting images" if knn else ""
                )
                notes.append(f"- **{d}** fixed weights ({w}){knn_note}; nothing chosen on test images.")
                continue
            metric = selection_metric(sel)
            how = (
                f"worst leave-one-family-out {metric} (supervised part refitted without each family)"
                if sel.get("refits")
                else f"worst per-family {metric}"
            )
            knn_note = f"; kNN reference {knn} paths per class, chosen there too" if knn else ""
            notes.append(
                f"- **{d}** weights ({w}) chosen by {how} on the validation fitting images "
                f"(families {', '.join(sel.get('families', []))}; {sel.get('candidates', '?')} candidate "
                f"vectors{knn_note}); never on test images."
            )
    return ["", "## Baselines and selections", ""] + notes if notes else []
