"""The pictures of ``pathguard explain``. Each function draws one figure from plain arrays and saves a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from ..models import GATE_THRESHOLD

DPI = 110


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _class_ticks(ax, classes: list[str], axis: str = "y") -> None:
    ticks = np.arange(len(classes))
    if axis == "y":
        ax.set_yticks(ticks, classes, fontsize=7)
    else:
        ax.set_xticks(ticks, classes, fontsize=7, rotation=60, ha="right")


def layer_usage(path: Path, freq: np.ndarray, classes: list[str], layer: str) -> str:
    """Heatmap (K classes x C filters, already ordered) of filter-on frequency for one layer."""
    k, c = freq.shape
    fig, ax = plt.subplots(figsize=(min(3 + c * 0.08, 16), 1.2 + 0.28 * k), layout="constrained")
    im = ax.imshow(freq, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    _class_ticks(ax, classes)
    ax.set_xlabel(f"filters of {layer} (grouped by the class using them most; {c} filters)")
    ax.set_title(f"{layer}: how often each filter is on, per class", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="fraction on")
    return _save(fig, path)


def usage_overview(path: Path, density: np.ndarray, classes: list[str], layers: list[str]) -> str:
    """Heatmap (K x L): mean fraction of a layer's filters on for inputs of each class."""
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * len(layers), 1.5 + 0.3 * len(classes)), layout="constrained")
    im = ax.imshow(density, aspect="auto", cmap="magma", vmin=0, vmax=max(float(density.max()), 1e-6))
    _class_ticks(ax, classes)
    ax.set_xticks(np.arange(len(layers)), layers, fontsize=6, rotation=60, ha="right")
    if len(layers) <= 16 and len(classes) <= 12:
        for (i, j), v in np.ndenumerate(density):
            ax.text(
                j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 * density.max() else "k"
            )
    ax.set_title("fraction of each layer's filters on, per class", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    return _save(fig, path)


def similarity_figure(
    path: Path, jaccard: np.ndarray, cosine: np.ndarray, per_layer: np.ndarray, classes: list[str], layers: list[str]
) -> str:
    """Class-by-class Jaccard and cosine matrices, and the mean off-diagonal similarity of each layer."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1, 1, 1.2]}, layout="constrained")
    for ax, mat, title in (
        (axes[0], jaccard, "Jaccard of prototype paths"),
        (axes[1], cosine, "cosine of filter frequencies"),
    ):
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=1)
        _class_ticks(ax, classes)
        _class_ticks(ax, classes, "x")
        if len(classes) <= 12:
            for (i, j), v in np.ndenumerate(mat):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v > 0.6 else "k")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    ax = axes[2]
    ax.plot(np.arange(len(layers)), per_layer, marker="o")
    ax.set_xticks(np.arange(len(layers)), layers, fontsize=6, rotation=60, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("mean Jaccard between different classes")
    ax.set_title("where class paths separate (lower = more class-specific)", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


KIND_COLORS = {"unused": "#bbbbbb", "specific": "#d62728", "some": "#ff7f0e", "shared": "#1f77b4"}


def specificity_figure(
    path: Path,
    counts: dict[str, list[int]],
    layers: list[str],
    per_class: list[int],
    classes: list[str],
    selectivity: list[np.ndarray],
) -> str:
    """Per layer, the share of filters used by no class / one / some / most; specific filters per class."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [1.3, 1, 1]}, layout="constrained")
    ax = axes[0]
    x = np.arange(len(layers))
    total = np.maximum(np.sum([counts[k] for k in counts], axis=0), 1)
    bottom = np.zeros(len(layers))
    for kind, vals in counts.items():
        share = np.asarray(vals) / total
        ax.bar(x, share, bottom=bottom, color=KIND_COLORS[kind], label=kind)
        bottom += share
    ax.set_xticks(x, layers, fontsize=6, rotation=60, ha="right")
    ax.set_ylabel("share of the layer's filters")
    ax.set_title("filters used by: no class / one class / some / more than half", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    ax = axes[1]
    ax.barh(np.arange(len(classes)), per_class, color=KIND_COLORS["specific"])
    _class_ticks(ax, classes)
    ax.invert_yaxis()
    ax.set_xlabel("filters only this class uses")
    ax.set_title("class-specific filters per class", fontsize=9)
    ax = axes[2]
    ax.boxplot(selectivity, showfliers=False)
    ax.set_xticks(np.arange(1, len(layers) + 1), layers, fontsize=6, rotation=60, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("selectivity (1 = one class only)")
    ax.set_title("how class-selective each layer's filters are", fontsize=9)
    return _save(fig, path)


_DIFF_CMAP = ListedColormap(["#2166ac", "#f7f7f7", "#b2182b"])  # missing, same, extra


def input_figure(
    path: Path,
    image: np.ndarray,
    title: str,
    proto_freq: np.ndarray,
    gates: np.ndarray,
    bounds: list[int],
    layers: list[str],
    hamming: np.ndarray,
    reference: dict[str, np.ndarray],
) -> str:
    """One input: the image, its per-layer distance to class prototypes, and its path against the prototype.

    proto_freq, gates : (G,) predicted class's filter frequencies and the input's hard path.
    bounds : start of each layer in the path, plus its end.
    reference : extra per-layer distance curves to draw (e.g. true class, nearest other class).
    """
    fig = plt.figure(figsize=(13, 6), layout="constrained")
    grid = fig.add_gridspec(4, 4, height_ratios=[2.4, 0.5, 0.5, 0.5], width_ratios=[1, 1.2, 1.2, 1.2])
    ax = fig.add_subplot(grid[0, 0])
    img = np.transpose(image, (1, 2, 0))
    ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None, vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    ax = fig.add_subplot(grid[0, 1:])
    x = np.arange(len(layers))
    ax.bar(x, hamming, color="#b2182b", alpha=0.8, label="to the predicted class's prototype")
    for name, curve in reference.items():
        ax.plot(x, curve, marker="o", lw=1, label=name)
    ax.set_xticks(x, layers, fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("Hamming distance\n(fraction of filters)", fontsize=8)
    ax.set_ylim(0, max(0.05, float(np.max([hamming.max(), *[c.max() for c in reference.values()]])) * 1.15))
    ax.legend(fontsize=7)
    ax.set_title("where the path departs from class prototypes, layer by layer", fontsize=9)
    diff = gates.astype(int) - (proto_freq > GATE_THRESHOLD).astype(int)
    rows = (
        (proto_freq[None, :], "viridis", (0, 1), "prototype: fraction on"),
        (gates[None, :], "Greys", (0, 1), "this input (black: on)"),
        (diff[None, :], _DIFF_CMAP, (-1, 1), "red: extra on, blue: missing"),
    )
    for r, (data, cmap, (lo, hi), label) in enumerate(rows):
        ax = fig.add_subplot(grid[1 + r, :])
        ax.imshow(data, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_yticks([0], [label], fontsize=7)
        for b in bounds[1:-1]:
            ax.axvline(b - 0.5, color="k", lw=0.6)
        ax.set_xticks(
            [] if r < 2 else [(a + b) / 2 for a, b in zip(bounds[:-1], bounds[1:])], [] if r < 2 else layers, fontsize=6
        )
    return _save(fig, path)
