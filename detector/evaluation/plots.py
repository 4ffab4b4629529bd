"""ROC curves and score histograms as PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from .metrics import roc_points


def write_plots(
    out: Path, scores: dict[str, dict], results: dict, thresholds: dict[str, float], attacks: list[str]
) -> list[str]:
    """One ROC figure per attack (every detector) and one histogram figure per detector."""
    files = []
    for attack in attacks:
        fig, ax = plt.subplots(figsize=(5, 5))
        for det, s in scores.items():
            if len(s.get(attack, [])) == 0:
                continue
            fpr, tpr = roc_points(s["clean"], s[attack])
            ax.plot(fpr, tpr, label=f"{det} (AUROC {results[det][attack]['auroc']:.3f})")
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set(
            xlabel="false-positive rate (clean flagged)",
            ylabel="true-positive rate (adversarial flagged)",
            title=f"ROC, {attack} (successful attacks)",
        )
        ax.legend(fontsize=7, loc="lower right")
        name = f"roc_{_safe(attack)}.png"
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    for det, s in scores.items():
        fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.2), squeeze=False)
        for ax, attack in zip(axes[0], attacks):
            ax.hist(s["clean"], bins=40, range=(0, 1), alpha=0.6, label="clean", density=True)
            if len(s.get(attack, [])):
                ax.hist(s[attack], bins=40, range=(0, 1), alpha=0.6, label=attack, density=True)
            ax.axvline(thresholds[det], c="k", ls="--", lw=1, label="threshold")
            ax.set(title=f"{det}: {attack}", xlabel="adversarial score")
            ax.legend(fontsize=7)
        name = f"hist_{_safe(det)}.png"
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def write_heatmap(out: Path, report: dict) -> str:
    """Detector x attack AUROC (successful attacks); unseen cells outlined and marked "u".

    Rows: each detector as fitted on every attack, then each supervised detector under leave-one-family-out
    (every cell of those rows is unseen)."""
    import numpy as np

    attacks = list(report["attacks"])
    rows, values, unseen = [], [], []
    for det, per in report["results"].items():
        rows.append(det)
        values.append([per[a]["auroc"] for a in attacks])
        unseen.append([not per[a].get("seen", True) for a in attacks])
    for det, fams in report.get("leave_one_family_out", {}).items():
        cells = {a: m for f in fams.values() for a, m in f.items()}
        rows.append(f"{det} (fit without the family)")
        values.append([cells.get(a, {}).get("auroc") for a in attacks])
        unseen.append([True] * len(attacks))
    v = np.array([[np.nan if x is None else x for x in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(attacks) + 3.5, 0.38 * len(rows) + 1.6))
    im = ax.imshow(v, cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(attacks)):
            if np.isnan(v[i, j]):
                continue
            ax.text(j, i, f"{v[i, j]:.2f}{' u' if unseen[i][j] else ''}", ha="center", va="center", fontsize=7)
            if unseen[i][j]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="black", lw=1.2))
    ax.set_xticks(range(len(attacks)), attacks, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title("AUROC, successful attacks (u, outlined: attack unseen in fitting)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    name = "heatmap.png"
    fig.savefig(out / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name
