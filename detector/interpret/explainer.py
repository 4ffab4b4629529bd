"""``pathguard explain``: pictures and numbers of how a decoupled model routes each class through its filters.

Writes into one directory, for a gated bundle:

* ``usage/<layer>.png|json`` — per-class filter-usage heatmap of every gated layer, and
  ``usage_overview.png|json`` — per-class density of every layer;
* ``similarity.png|json`` — class-to-class path similarity (Jaccard of prototype paths, cosine of
  frequencies), overall and per layer;
* ``specificity.png|json`` — filters specific to one class vs shared by many;
* ``inputs/input_<i>.png|json`` — chosen inputs' paths against their predicted class's prototype;
* ``report.md`` tying them together, and ``index.json`` listing every file.

Every figure has the JSON it was drawn from beside it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..bundle import BUNDLE_HELP, Bundle, load_bundle
from ..models import GATE_THRESHOLD, PathOutput
from ..prototypes import Prototypes, compute_prototypes
from . import analysis
from .report import write_report

log = logging.getLogger(__name__)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--indices {text!r} must be comma-separated integers, e.g. 3,17,42") from None


def _plots():
    """The figure module, imported on first drawing: matplotlib is absent where only the server runs."""
    from . import plots

    return plots


@dataclass
class ExplainConfig:
    """What ``pathguard explain`` explains.

    bundle : gated bundle directory.
    out : output directory (created).
    images : how many images of ``split`` to explain (seeded random choice) when neither ``indices`` nor
        ``image_files`` is given.
    indices : positions in ``split`` of the images to explain.
    image_files : image files (PNG, JPEG, ...) to explain; converted to the model's channels and resized to its
        input size if needed.
    attack_file : an ``.npz`` written by ``pathguard attack``: explain its first ``images`` adversarial images
        (with their true labels), to see where an attacked input's path leaves its class.
    split : ``"test"`` or ``"val"``.
    threshold : a filter belongs to a class's prototype path (and the class "uses" it) when it is on for more
        than this fraction of the class's inputs. 0.5 matches the prototypes the detector uses.
    prototype_images : training images to compute prototypes from when the bundle has none.
    seed : for the random choice of images.
    data_root : where the bundle's dataset lives, if not where it was trained from.
    """

    bundle: str = field(default="", metadata={"help": BUNDLE_HELP})
    out: str = field(default="", metadata={"help": "output directory", "required": True})
    images: int = field(default=4, metadata={"help": "how many random images of --split to explain"})
    indices: tuple[int, ...] = field(
        default=(), metadata={"help": "explain these positions of --split instead, e.g. 3,17,42", "parse": _ints}
    )
    image_files: tuple[str, ...] = field(
        default=(), metadata={"help": "explain these image files instead", "nargs": "+", "metavar": "FILE"}
    )
    attack_file: str | None = field(
        default=None,
        metadata={
            "help": "explain the first --images adversarial images of an .npz written by `pathguard attack` instead",
            "metavar": "NPZ",
        },
    )
    split: str = field(default="test", metadata={"choices": ("test", "val")})
    threshold: float = field(
        default=GATE_THRESHOLD, metadata={"help": "frequency above which a filter is in a class's prototype path"}
    )
    prototype_images: int = field(
        default=5000, metadata={"help": "training images to compute prototypes from if the bundle has none"}
    )
    seed: int = 0
    data_root: str | None = None

    def __post_init__(self) -> None:
        if self.split not in ("test", "val"):
            raise ValueError(f"split={self.split!r} must be 'test' or 'val'")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1)")
        if self.images < 0:
            raise ValueError(f"images={self.images} must be >= 0")


def _write_json(path: Path, obj: dict) -> str:
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path.name


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def _round(t: Tensor | np.ndarray, digits: int = 4) -> list:
    return np.round(np.asarray(t, dtype=np.float64), digits).tolist()


def bundle_prototypes(bundle: Bundle, n_images: int = 5000, data_root: str | None = None) -> tuple[Prototypes, str]:
    """The bundle's prototypes part, or prototypes computed from its training split; and where they came from."""
    protos = bundle.prototypes()
    if protos is not None:
        return protos, f"the bundle's prototypes part ({int(protos.counts.sum())} correctly classified training images)"
    from ..splits import bundle_splits

    train = bundle_splits(bundle.meta, data_root).train
    n = min(n_images, len(train))
    log.info("bundle has no prototypes part; computing them from %d training images", n)
    protos = compute_prototypes(bundle.model, train.subset(torch.arange(n)))
    return protos, f"computed now from the first {n} training images ({int(protos.counts.sum())} classified correctly)"


def load_image_files(files: list[str], shape: tuple[int, int, int]) -> Tensor:
    """Image files as a float batch (N, C, H, W) in [0, 1] of the model's ``shape``."""
    from PIL import Image

    c, h, w = shape
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                log.warning("%s is %dx%d; resizing to the model's %dx%d", f, im.size[0], im.size[1], w, h)
                im = im.resize((w, h), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
        out.append(arr[None] if c == 1 else arr.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def _chosen_inputs(cfg: ExplainConfig, bundle: Bundle) -> tuple[Tensor, list[int | None], list[str]]:
    """(images, true labels or None, description of each) of the inputs to explain."""
    if cfg.image_files:
        images = load_image_files(list(cfg.image_files), bundle.input_shape)
        return images, [None] * len(images), [f"file {Path(f).name}" for f in cfg.image_files]
    if cfg.attack_file:
        from ..attacks.runner import read_result

        adv, labels, meta = read_result(cfg.attack_file)
        adv, labels, attack = adv[: cfg.images], labels[: cfg.images], meta.get("attack", "attack")
        if tuple(adv.shape[1:]) != tuple(bundle.input_shape):
            raise ValueError(
                f"{cfg.attack_file}: images of shape {tuple(adv.shape[1:])} do not fit the model's "
                f"{tuple(bundle.input_shape)}"
            )
        return (
            torch.from_numpy(adv.astype(np.float32)),
            [int(v) for v in labels],
            [f"{attack} adversarial #{i}" for i in range(len(adv))],
        )
    if not cfg.indices and cfg.images == 0:
        return torch.zeros(0, *bundle.input_shape), [], []
    from ..splits import bundle_splits

    splits = bundle_splits(bundle.meta, cfg.data_root)
    data = splits.test if cfg.split == "test" else splits.val
    if cfg.indices:
        bad = [i for i in cfg.indices if not 0 <= i < len(data)]
        if bad:
            raise ValueError(f"indices {bad} are outside the {cfg.split} split's {len(data)} images")
        idx = torch.tensor(cfg.indices, dtype=torch.long)
    else:
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.images]
    return data.float_images(idx), data.labels[idx].tolist(), [f"{data.name} #{int(i)}" for i in idx]


def explain(cfg: ExplainConfig, bundle: Bundle | None = None) -> dict:
    """Write the explanation of ``cfg.bundle`` into ``cfg.out``; return the index (also ``index.json``)."""
    bundle = bundle or load_bundle(cfg.bundle)
    model = bundle.model.eval()
    if not model.gated:
        raise ValueError(f"bundle {cfg.bundle} is a dense model: it has no calculation paths to explain")
    images, labels, names = _chosen_inputs(cfg, bundle)  # first: a bad index fails before any work
    out = Path(cfg.out)
    (out / "usage").mkdir(parents=True, exist_ok=True)
    (out / "inputs").mkdir(exist_ok=True)
    protos, source = bundle_prototypes(bundle, cfg.prototype_images, cfg.data_root)
    classes, layers = list(bundle.classes), list(protos.layer_names)
    index: dict = {
        "bundle": str(cfg.bundle),
        "arch": bundle.meta["arch"],
        "classes": classes,
        "layers": layers,
        "layer_sizes": protos.layer_sizes,
        "prototypes": source,
        "config": asdict(cfg),
        "class_counts": protos.counts.int().tolist(),
        "files": {},
    }

    index["files"]["usage"] = _usage(out, protos, classes, layers)
    index["class_density"] = dict(zip(classes, _round(protos.frequency.mean(1), 4)))
    index["files"]["similarity"], index["similarity_summary"] = _similarity(out, protos, classes, layers, cfg.threshold)
    index["files"]["specificity"], index["specificity_summary"] = _specificity(
        out, protos, classes, layers, cfg.threshold
    )
    index["files"]["inputs"], index["inputs"] = _inputs(out, model, protos, classes, layers, images, labels, names)
    index["files"]["report"] = write_report(out, index)
    _write_json(out / "index.json", index)
    return index


def _usage(out: Path, protos: Prototypes, classes: list[str], layers: list[str]) -> dict:
    files = []
    density = []
    for name, freq in analysis.layer_frequencies(protos).items():
        order = analysis.filter_order(freq)
        stem = f"usage/{_safe(name)}"
        _plots().layer_usage(out / f"{stem}.png", freq[:, order].numpy(), classes, name)
        _write_json(
            out / f"{stem}.json",
            {
                "layer": name,
                "classes": classes,
                "filters": freq.shape[1],
                "frequency": _round(freq),
                "frequency_doc": "frequency[k][j]: fraction of class k's (correctly "
                "classified training) inputs for which filter j of this layer is on",
                "filter_order": order.tolist(),
                "filter_order_doc": "column order of the picture",
            },
        )
        files.append({"layer": name, "png": f"{stem}.png", "json": f"{stem}.json"})
        density.append(freq.mean(1))
    dens = torch.stack(density, dim=1)  # (K, L)
    _plots().usage_overview(out / "usage_overview.png", dens.numpy(), classes, layers)
    _write_json(
        out / "usage_overview.json",
        {
            "classes": classes,
            "layers": layers,
            "density": _round(dens),
            "density_doc": "density[k][l]: mean over layer l's filters of how often they are on for class k",
        },
    )
    return {"overview": {"png": "usage_overview.png", "json": "usage_overview.json"}, "layers": files}


def _off_diagonal_mean(m: Tensor) -> float:
    k = m.shape[0]
    return float((m.sum() - m.diagonal().sum()) / max(k * (k - 1), 1))


def _similarity(
    out: Path, protos: Prototypes, classes: list[str], layers: list[str], threshold: float
) -> tuple[dict, dict]:
    sims = analysis.similarities(protos, threshold)
    jac, cos = sims["jaccard"]["path"], sims["cosine"]["path"]
    per_layer = [_off_diagonal_mean(sims["jaccard"]["layers"][n]) for n in layers]
    _plots().similarity_figure(out / "similarity.png", jac.numpy(), cos.numpy(), np.array(per_layer), classes, layers)
    k = len(classes)
    pairs = sorted(
        ((float(jac[a, b]), classes[a], classes[b]) for a in range(k) for b in range(a + 1, k)), reverse=True
    )
    summary = {
        "most_similar": [{"classes": [a, b], "jaccard": round(s, 4)} for s, a, b in pairs[:5]],
        "least_similar": [{"classes": [a, b], "jaccard": round(s, 4)} for s, a, b in pairs[-5:][::-1]],
        "mean_jaccard_between_classes": round(_off_diagonal_mean(jac), 4),
        "mean_jaccard_between_classes_per_layer": dict(zip(layers, [round(v, 4) for v in per_layer])),
    }
    _write_json(
        out / "similarity.json",
        {
            "classes": classes,
            "threshold": threshold,
            "jaccard": _round(jac),
            "jaccard_doc": "Jaccard index of the sets of filters each class switches on for "
            "more than `threshold` of its inputs (its prototype path), over all gated layers",
            "cosine": _round(cos),
            "cosine_doc": "cosine similarity of the classes' filter-frequency vectors",
            "per_layer": {n: {m: _round(sims[m]["layers"][n]) for m in analysis.SIMILARITIES} for n in layers},
            **summary,
        },
    )
    return {"png": "similarity.png", "json": "similarity.json"}, summary


def _specificity(
    out: Path, protos: Prototypes, classes: list[str], layers: list[str], threshold: float
) -> tuple[dict, dict]:
    spec = analysis.specificity(protos.frequency, threshold)
    kinds = spec.kind(len(classes))
    counts = {kind: [] for kind in analysis.KINDS}
    per_layer, selectivity = {}, []
    specific = []
    for name, sl in zip(layers, protos.layer_slices()):
        layer_kinds = kinds[sl]
        for kind in analysis.KINDS:
            counts[kind].append(layer_kinds.count(kind))
        per_layer[name] = {kind: layer_kinds.count(kind) for kind in analysis.KINDS}
        selectivity.append(spec.selectivity[sl].numpy())
        for j, kind in enumerate(layer_kinds):
            if kind == "specific":
                g = sl.start + j
                specific.append(
                    {
                        "layer": name,
                        "filter": j,
                        "class": classes[int(spec.owner[g])],
                        "frequency": round(float(protos.frequency[spec.owner[g], g]), 4),
                        "selectivity": round(float(spec.selectivity[g]), 4),
                    }
                )
    per_class = [sum(1 for s in specific if s["class"] == c) for c in classes]
    _plots().specificity_figure(out / "specificity.png", counts, layers, per_class, classes, selectivity)
    summary = {
        "filters": int(len(kinds)),
        **{kind: kinds.count(kind) for kind in analysis.KINDS},
        "specific_per_class": dict(zip(classes, per_class)),
    }
    _write_json(
        out / "specificity.json",
        {
            "classes": classes,
            "threshold": threshold,
            "kinds_doc": "a class uses a filter when the filter is on for more than `threshold` of its inputs; "
            "unused: no class, specific: exactly one, some: 2 up to half the classes, shared: more than half",
            "per_layer": per_layer,
            "specific_filters": specific,
            "users": spec.users.tolist(),
            "owner": spec.owner.tolist(),
            "selectivity": _round(spec.selectivity),
            "selectivity_doc": "1 - entropy of the filter's frequencies across classes / log K: 1 = one class only",
            **summary,
        },
    )
    return {"png": "specificity.png", "json": "specificity.json"}, summary


def _reference_departures(dep: analysis.Departure, label: int | None, classes: list[str]) -> dict[str, np.ndarray]:
    """Per-layer Hamming distance of the input's path to the true class (when it is not the predicted one) and to
    the nearest other class than the predicted one, the lines an input's figure draws for comparison."""
    pred = dep.predicted
    reference = {}
    if label is not None and label != pred:
        reference[f"to the true class ({classes[label]})"] = dep.hamming_all[:, label].numpy()
    others = dep.hamming_all.clone()
    others[:, pred] = float("inf")
    runner = int(others.mean(0).argmin())
    reference[f"to the nearest other class ({classes[runner]})"] = dep.hamming_all[:, runner].numpy()
    return reference


def _layer_departures(dep: analysis.Departure, path: PathOutput, i: int, classes: list[str], layers: list[str]) -> dict:
    """The ``layers`` and ``doc`` entries of input ``i``'s JSON: how its path departs from the prototypes."""
    return {
        "layers": [
            {
                "layer": n,
                "hamming_to_predicted": round(float(dep.hamming[j]), 4),
                "hamming_to_class": dict(zip(classes, _round(dep.hamming_all[j]))),
                "nearest_class": classes[int(dep.nearest[j])],
                "extra_filters": dep.extra[j],
                "missing_filters": dep.missing[j],
                "log_likelihood_under_predicted": round(float(dep.log_likelihood[j]), 4),
                "active": int(path.layers[j].hard[i].sum()),
                "filters": int(path.layers[j].hard.shape[1]),
            }
            for j, n in enumerate(layers)
        ],
        "doc": "hamming: fraction of the layer's filters where this input's on/off differs from the class's "
        "prototype path; extra_filters: on here but not in the predicted class's prototype; "
        "missing_filters: in the prototype but off here",
    }


@torch.no_grad()
def _inputs(
    out: Path,
    model,
    protos: Prototypes,
    classes: list[str],
    layers: list[str],
    images: Tensor,
    labels: list[int | None],
    names: list[str],
) -> tuple[list[dict], list[dict]]:
    if len(images) == 0:
        return [], []
    path = model.forward_path(images)
    probs = path.logits.softmax(1)
    deps = analysis.departures(path, protos)
    hard = path.hard_path
    bounds = [0, *np.cumsum(protos.layer_sizes).tolist()]
    files, summaries = [], []
    for i, (dep, label, name) in enumerate(zip(deps, labels, names)):
        pred = dep.predicted
        reference = _reference_departures(dep, label, classes)
        title = f"{name}\npredicted {classes[pred]} ({float(probs[i, pred]):.2f})" + (
            "" if label is None else f", true {classes[label]}"
        )
        stem = f"inputs/input_{i:03d}"
        _plots().input_figure(
            out / f"{stem}.png",
            images[i].numpy(),
            title,
            protos.frequency[pred].numpy(),
            hard[i].numpy(),
            bounds,
            layers,
            dep.hamming.numpy(),
            reference,
        )
        worst = int(dep.hamming.argmax())
        summary = {
            "input": name,
            "png": f"{stem}.png",
            "json": f"{stem}.json",
            "predicted": classes[pred],
            "probability": round(float(probs[i, pred]), 4),
            "true": None if label is None else classes[label],
            "mean_departure": round(float(dep.hamming.mean()), 4),
            "largest_departure": {"layer": layers[worst], "hamming": round(float(dep.hamming[worst]), 4)},
            "flops_ratio": round(float(path.flops_ratio[i]), 4),
        }
        _write_json(
            out / f"{stem}.json",
            {
                **summary,
                "probabilities": dict(zip(classes, _round(probs[i]))),
                **_layer_departures(dep, path, i, classes, layers),
            },
        )
        files.append({"png": f"{stem}.png", "json": f"{stem}.json"})
        summaries.append(summary)
    return files, summaries
