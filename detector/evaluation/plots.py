"""ROC curves and score histograms as PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from .metrics import roc_points


def write_plots(out: Path, scores: dict[str, dict], results: dict, thresholds: dict[str, float],
                attacks: list[str]) -> list[str]:
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
        ax.set(xlabel="false-positive rate (clean flagged)", ylabel="true-positive rate (adversarial flagged)",
               title=f"ROC, {attack} (successful attacks)")
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
