"""The accuracy / FLOPs trade-off of trained bundles, against their dense twin: JSON, Markdown and a plot.

Every figure comes from the bundles' own ``bundle.json`` (their test metrics, written when they were
trained, over the full test split) and, where given, from evaluation reports (``pathguard evaluate``)
whose ``bundle.model_sha256`` matches a bundle's weights; nothing is re-measured or typed in here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from ..bundle import BundleError, read_meta, verify_files
from .config import TrainConfig

log = logging.getLogger(__name__)

_CONFIG_KEYS = (
    "epochs",
    "target_flops",
    "w_sparsity",
    "align_mode",
    "aux_warmup",
    "init_from",
    "distill",
    "distill_features",
    "freeze_gates_epochs",
    "seed",
    "gate",
)
# Settings that say where or how fast a run went, not what it learnt: ignored when runs are matched by recipe.
_NOT_RECIPE = ("seed", "device", "threads", "data_root")


def recipe_digest(train_config: dict) -> str:
    """SHA-256 of every training setting but :data:`_NOT_RECIPE`: two runs share a recipe when equal. A setting
    that a bundle does not record (it predates the setting) is taken at its default, which keeps the old
    behaviour (:class:`~detector.training.config.TrainConfig`)."""
    recipe = {k: v for k, v in TrainConfig.from_dict(train_config).to_dict().items() if k not in _NOT_RECIPE}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _recipe(path: Path, cfg: dict) -> str | None:
    if not cfg:
        return None  # no recorded recipe: the bundle joins no seed group
    try:
        return recipe_digest(cfg)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"bundle {path}: train_config is not a training recipe this version reads: {exc}") from exc


def _point(path: Path, meta: dict) -> dict:
    test = (meta.get("metrics") or {}).get("test")
    if not isinstance(test, dict) or "accuracy" not in test:
        raise BundleError(f"bundle {path}: bundle.json has no test metrics (metrics.test.accuracy)")
    cfg = meta.get("train_config") or {}
    point = {
        "name": path.name,
        "path": str(path),
        "gated": meta["gated"],
        "model_sha256": meta["files"]["model.safetensors"],
        "config": {k: cfg.get(k) for k in _CONFIG_KEYS if k in cfg},
        "recipe_sha256": _recipe(path, cfg),
        "accuracy": test["accuracy"],
        "n_test": test.get("n"),
        "flops_ratio": test.get("flops_ratio", 1.0),
        "epoch_seconds": test.get("epoch_seconds"),
    }
    if meta["gated"]:
        point.update(
            gate_density=test.get("gate_density"),
            layer_density=test.get("layer_density"),
            path_head_accuracy=test.get("path_head_accuracy"),
            hamming_same_class=test.get("hamming_same_class"),
            hamming_other_class=test.get("hamming_other_class"),
        )
        same, other = test.get("hamming_same_class"), test.get("hamming_other_class")
        point["hamming_separation"] = None if same is None or other is None else other - same
    return point


def _load(path: str | Path) -> tuple[Path, dict]:
    path = Path(path)
    meta = read_meta(path)
    verify_files(path, meta)
    return path, meta


def _detection(evaluations: list[str | Path], detector: str) -> dict[str, dict]:
    """model SHA-256 -> {attack: AUROC of ``detector`` on successful attacks, report path}."""
    by_model: dict[str, dict] = {}
    for ev in evaluations:
        try:
            report = json.loads(Path(ev).read_text())
            sha = report["bundle"]["model_sha256"]
            results = report["results"][detector]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"evaluation report {ev}: cannot read {detector!r} results and bundle.model_sha256 ({exc!r})"
            ) from None
        by_model[sha] = {
            "report": str(ev),
            "detector": detector,
            "auroc": {attack: r["auroc"] for attack, r in results.items() if isinstance(r, dict)},
        }
    return by_model


def tradeoff_report(
    bundles: list[str | Path],
    out_dir: str | Path,
    *,
    dense: str | Path | Sequence[str | Path] | None = None,
    evaluations: list[str | Path] = (),
    detector: str = "path",
) -> dict:
    """Write ``tradeoff.json``, ``tradeoff.md`` and ``tradeoff.png`` to ``out_dir``; return the JSON.

    ``dense`` is the dense twin every gap is measured against: one bundle for all, or one per bundle in
    the order of ``bundles`` (a twin trained the same total number of epochs as each decoupled model).
    """
    if not bundles:
        raise ValueError("bundles=[] : give at least one trained bundle")
    twins = _twins(bundles, dense)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    detection = _detection(list(evaluations), detector)
    dense_points: dict[str, dict] = {}
    for twin in dict.fromkeys(t for t in twins if t is not None):
        dpath, dmeta = _load(twin)
        if dmeta["gated"]:
            raise ValueError(f"dense={str(dpath)!r} is a gated bundle; the reference must be the dense twin")
        dense_points[str(twin)] = {**_point(dpath, dmeta), "arch": dmeta["arch"]}
    points = []
    for b, twin in zip(bundles, twins):
        path, meta = _load(b)
        p = _point(path, meta)
        if twin is not None:
            d = dense_points[str(twin)]
            if meta["arch"] != d["arch"]:
                raise ValueError(f"bundle {path} is {meta['arch']}, the dense twin {twin} is {d['arch']}")
            p["dense_twin"] = d["name"]
            p["gap_to_dense_points"] = round(100 * (d["accuracy"] - p["accuracy"]), 3)
        if p["model_sha256"] in detection:
            p["detection"] = detection[p["model_sha256"]]
        points.append(p)
    unmatched = set(detection) - {p["model_sha256"] for p in points}
    if unmatched:
        log.warning("%d evaluation report(s) match none of the bundles' weights", len(unmatched))
    points.sort(key=lambda p: -p["flops_ratio"])
    report = {
        "what": "test-set accuracy against executed FLOPs (controlling modules included), per bundle",
        "dense": list(dense_points.values()),
        "points": points,
        "seed_groups": _seed_groups(points),
        "files": ["tradeoff.json", "tradeoff.md", "tradeoff.png"],
    }
    (out / "tradeoff.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "tradeoff.md").write_text(_markdown(report))
    _plot(report, out / "tradeoff.png")
    return report


def _seed_groups(points: list[dict]) -> list[dict]:
    """Bundles trained with the same recipe (every recorded setting but the seed and where the run went,
    :func:`recipe_digest`; and the same twin) and more than one seed: the spread of their accuracy, gap and
    path-head accuracy, which says what a difference between two single runs is worth."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        if p["recipe_sha256"] is not None:
            groups.setdefault(json.dumps([p["recipe_sha256"], p.get("dense_twin")]), []).append(p)
    out = []
    for members in groups.values():
        members = sorted(members, key=lambda m: (m["config"].get("seed") or 0, m["name"]))
        if len({m["config"].get("seed") for m in members}) < 2:
            continue
        row = {"bundles": [m["name"] for m in members], "seeds": [m["config"].get("seed") for m in members]}
        for key in ("accuracy", "gap_to_dense_points", "path_head_accuracy", "flops_ratio"):
            vals = [m[key] for m in members if m.get(key) is not None]
            if vals:
                mean = sum(vals) / len(vals)
                row[key] = {"mean": mean, "min": min(vals), "max": max(vals)}
        out.append(row)
    return out


def _twins(bundles: list[str | Path], dense) -> list[str | Path | None]:
    if dense is None:
        return [None] * len(bundles)
    if isinstance(dense, (str, Path)):
        return [dense] * len(bundles)
    dense = list(dense)
    if len(dense) == 1:
        return dense * len(bundles)
    if len(dense) != len(bundles):
        raise ValueError(
            f"{len(dense)} dense twins for {len(bundles)} bundles: give one twin for all, or one per bundle in order"
        )
    return dense


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _markdown(report: dict) -> str:
    attacks = sorted({a for p in report["points"] for a in (p.get("detection") or {}).get("auroc", {})})
    head = ["bundle", "FLOPs", "accuracy", "gap to dense twin (pts)", "q(y|path)", "Hamming same / other", *attacks]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in report["dense"]:
        rows.append(f"| {d['name']} (dense twin) | 1.000 | {d['accuracy']:.4f} | 0 | – | – |" + " – |" * len(attacks))
    for p in report["points"]:
        auroc = (p.get("detection") or {}).get("auroc", {})
        gap = _fmt(p.get("gap_to_dense_points"), ".2f") + (f" (vs {p['dense_twin']})" if "dense_twin" in p else "")
        rows.append(
            f"| {p['name']} | {p['flops_ratio']:.3f} | {p['accuracy']:.4f} | {gap} | "
            f"{_fmt(p.get('path_head_accuracy'), '.4f')} | "
            f"{_fmt(p.get('hamming_same_class'), '.3f')} / {_fmt(p.get('hamming_other_class'), '.3f')} | "
            + " | ".join(_fmt(auroc.get(a), ".3f") for a in attacks)
            + (" |" if attacks else "")
        )
    det = {(p.get("detection") or {}).get("detector") for p in report["points"]} - {None}
    note = f"\nDetection: AUROC of the `{det.pop()}` detector, successful attacks.\n" if det else "\n"
    for g in report.get("seed_groups", []):
        acc, gap = g["accuracy"], g.get("gap_to_dense_points")
        note += (
            f"\nOne recipe, seeds {', '.join(str(x) for x in g['seeds'])} ({', '.join(g['bundles'])}): accuracy "
            f"{acc['mean']:.4f} mean, {acc['min']:.4f}-{acc['max']:.4f}"
            + (f"; gap {gap['mean']:.2f} points mean, {gap['min']:.2f}-{gap['max']:.2f}" if gap else "")
            + ".\n"
        )
    return (
        "# Accuracy against executed FLOPs\n\nFrom each bundle's `bundle.json` (test split); regenerate with "
        "`pathguard training-report`.\n\n" + "\n".join(rows) + "\n" + note
    )


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = report["points"]
    gated = [p for p in pts if p["gated"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([p["flops_ratio"] for p in pts], [100 * p["accuracy"] for p in pts], "o", label="test accuracy")
    for p in pts:
        ax1.annotate(
            p["name"], (p["flops_ratio"], 100 * p["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    if gated and any(p.get("path_head_accuracy") is not None for p in gated):
        ax1.plot(
            [p["flops_ratio"] for p in gated],
            [100 * (p.get("path_head_accuracy") or 0) for p in gated],
            "s",
            label="q(y | path) accuracy",
        )
    for d in report["dense"]:
        ax1.axhline(100 * d["accuracy"], ls="--", c="grey", lw=0.8)
        ax1.annotate(
            f"{d['name']} (dense)",
            (0.0, 100 * d["accuracy"]),
            fontsize=7,
            xytext=(3, 2),
            textcoords="offset points",
            xycoords=("axes fraction", "data"),
        )
    ax1.set(xlabel="executed FLOPs / dense", ylabel="accuracy (%)", title="accuracy against compute")
    ax1.legend(fontsize=8)
    sep = [p for p in gated if p.get("hamming_separation") is not None]
    ax2.plot([p["flops_ratio"] for p in sep], [p["hamming_same_class"] for p in sep], "o", label="same class")
    ax2.plot([p["flops_ratio"] for p in sep], [p["hamming_other_class"] for p in sep], "s", label="other class")
    ax2.set(
        xlabel="executed FLOPs / dense",
        ylabel="mean normalised Hamming distance",
        title="how far apart class paths are",
    )
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
