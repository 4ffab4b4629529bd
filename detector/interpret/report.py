"""``report.md`` of ``pathguard explain``: the figures, with what each shows, for a reader new to the method."""

from __future__ import annotations

from pathlib import Path

INTRO = """\
## How to read this

This model is a *decoupled* convolutional network. In front of every convolution layer sits a small
**controlling module** that looks at the layer's input and decides, for this one image, which of the
layer's filters run (**gate on**) and which are skipped (**gate off**). The on/off decisions of all
layers together are the image's **calculation path**: a list of bits, one per filter.

Training pushes images of the same class to take similar paths and different classes to take different
ones, so the path itself says how the network reached its answer — which filters it used, and at which
depth the classes part ways. A class's **prototype path** is the set of filters that are on for most
(more than {threshold:.0%}) of its training images; the **frequency** of a filter for a class is the
fraction of the class's images for which it is on. Prototypes here: {source}.

Every picture has a JSON file of the numbers behind it next to it.
"""


def _density_sentence(index: dict) -> str:
    density = index.get("class_density", {})
    if not density:
        return ""
    lo, hi = min(density, key=density.get), max(density, key=density.get)
    return (
        f"Over the whole path, **{lo}** uses the fewest filters ({density[lo]:.0%} of them on average) and "
        f"**{hi}** the most ({density[hi]:.0%})."
    )


def _img(path: str, alt: str) -> str:
    return f"![{alt}]({path})"


# Over 60 lines on purpose: one Markdown page written top to bottom in the order it reads.
def write_report(out: Path, index: dict) -> str:
    """Write ``out/report.md`` from the index :func:`~detector.interpret.explain.explain` builds."""
    cfg, files = index["config"], index["files"]
    classes, layers = index["classes"], index["layers"]
    lines = [
        f"# How `{index['arch']}` routes each class: path-level explanation",
        "",
        f"Bundle `{index['bundle']}`: {len(classes)} classes, {len(layers)} gated layers, "
        f"{sum(index['layer_sizes'])} gated filters.",
        "",
        INTRO.format(threshold=cfg["threshold"], source=index["prototypes"]),
        "",
    ]

    usage = files["usage"]
    lines += [
        "## 1. Which filters each class uses",
        "",
        "Per class (rows) and layer (columns): the average fraction of the layer's filters that are on. "
        "Low values mean the class gets by with few filters in that layer.",
        "",
        _density_sentence(index),
        "",
        _img(usage["overview"]["png"], "per-class density of every layer"),
        f"([numbers]({usage['overview']['json']}))",
        "",
        "Per layer, every filter (column) against every class (rows): colour is how often the filter is "
        "on for the class's images. Filters are grouped by the class that uses them most, so a bright block "
        "in one row only is a filter that class has to itself; a bright column is a filter all classes use.",
        "",
    ]
    many = len(usage["layers"]) > 12
    for f in usage["layers"]:
        if many:
            lines.append(f"- `{f['layer']}`: [picture]({f['png']}), [numbers]({f['json']})")
        else:
            lines += [
                f"### `{f['layer']}`",
                "",
                _img(f["png"], f"filter usage of {f['layer']}"),
                f"([numbers]({f['json']}))",
                "",
            ]
    lines.append("")

    sim = index["similarity_summary"]
    lines += [
        "## 2. Which classes take similar paths",
        "",
        "Left: Jaccard index of two classes' prototype paths (shared filters / filters used by either; 1 = "
        "identical paths). Middle: cosine similarity of their filter frequencies (softer: counts filters "
        "used some of the time). Right: the average Jaccard between different classes in each layer alone "
        "— where it drops, the classes stop sharing filters.",
        "",
        _img(files["similarity"]["png"], "class-to-class path similarity"),
        f"([numbers]({files['similarity']['json']}))",
        "",
        f"Mean Jaccard between different classes: {sim['mean_jaccard_between_classes']:.3f}. Most similar:",
        "",
    ]
    lines += [f"- {p['classes'][0]} / {p['classes'][1]}: {p['jaccard']:.3f}" for p in sim["most_similar"]]
    least = [p for p in sim["least_similar"] if p not in sim["most_similar"]]
    if least:
        lines += ["", "Least similar:", ""]
        lines += [f"- {p['classes'][0]} / {p['classes'][1]}: {p['jaccard']:.3f}" for p in least]
    per_layer = sim["mean_jaccard_between_classes_per_layer"]
    if per_layer:
        lo, hi = min(per_layer, key=per_layer.get), max(per_layer, key=per_layer.get)
        lines += [
            "",
            f"Classes share the most filters in `{hi}` (mean Jaccard {per_layer[hi]:.3f}) and the fewest "
            f"in `{lo}` ({per_layer[lo]:.3f}): that is the layer where this model's class paths part most.",
        ]
    lines.append("")

    spec = index["specificity_summary"]
    lines += [
        "## 3. Filters specific to one class vs shared by many",
        "",
        f"A class *uses* a filter when the filter is on for more than {cfg['threshold']:.0%} of its images. "
        f"Of {spec['filters']} gated filters, {spec['specific']} are used by exactly one class (specific), "
        f"{spec['shared']} by more than half of the classes (shared), {spec['some']} by a few, and "
        f"{spec['unused']} by none (the controlling modules keep them off: they cost nothing at inference).",
        "",
        "Left: the mix per layer. Middle: how many specific filters each class has. Right: per layer, the "
        "spread of filter selectivity (1 = only one class ever switches it on, 0 = all classes equally).",
        "",
        _img(files["specificity"]["png"], "specific and shared filters"),
        f"([numbers, including the list of class-specific filters]({files['specificity']['json']}))",
        "",
    ]

    lines += ["## 4. Single inputs against their class's prototype", ""]
    if not index["inputs"]:
        lines += ["No inputs were chosen (`--images 0`).", ""]
    else:
        lines += [
            "For each input: the image; per layer, the Hamming distance between its path and the predicted "
            "class's prototype path (bars), and to other classes' prototypes (lines); below, the predicted "
            "class's filter frequencies, the input's own on/off path, and the difference (red: on here but "
            "not in the prototype, blue: in the prototype but off here). A correctly classified input stays "
            "close to its prototype in every layer. An input that departs — especially one whose early layers "
            "follow one class and late layers another, the signature of an adversarial example — takes an "
            "unusual route to its answer.",
            "",
        ]
        for s in index["inputs"]:
            true = "" if s["true"] is None else f", true class **{s['true']}**"
            lines += [
                f"### {s['input']}",
                "",
                f"Predicted **{s['predicted']}** ({s['probability']:.2f}){true}. Mean departure "
                f"{s['mean_departure']:.3f}; largest in `{s['largest_departure']['layer']}` "
                f"({s['largest_departure']['hamming']:.3f}). Executed FLOPs: {s['flops_ratio']:.0%} of the dense "
                "network.",
                "",
                _img(s["png"], f"path of {s['input']}"),
                f"([numbers]({s['json']}))",
                "",
            ]
    lines += ["## Files", "", "`index.json` lists every file written and the settings used.", ""]
    (out / "report.md").write_text("\n".join(lines))
    return "report.md"
