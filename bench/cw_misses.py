"""What caps the clean-only detectors on CW, measured on the evaluation's *validation* rows (issue 14).

Every clean-only score tops out near 75-78% TPR at 5% FPR on CW, the weakest attack of the matrix. Three
measurements say why and what does not fix it:

1. ``cw_split``: the successful CW examples that a low-margin threshold (the clean images' 5% margin quantile)
   misses, against those it catches: how many, their L2 perturbation, their softmax margin and how many hard
   gates differ from the clean image's path. A classifier with hard gates is discontinuous; an example that
   flips more gates with a *smaller* perturbation and lands far from the decision boundary has used a jump.
2. ``joint_blocks``: the clean-only joint kNN score (``clean-joint``, the same arithmetic as
   :class:`~detector.detectors.joint.PathOutputKNNDetector`) with other blocks beside the soft path, logits and
   log margin: each layer's pooled response (``log1p``), the penultimate features (``log1p``), and other
   margin and logit weights: AUROC and TPR at the threshold set on the calibration images, per attack.
3. ``margin_and_gate_edges``: two other clean-only statistics beside the plain low margin: the margin judged
   against the clean margins of the predicted class, and the share of soft gates left on the edge of switching.
4. ``soft_gates``: the same image run again with the gated layers from ``first`` on multiplying by the soft gate p
   instead of the hard gate (the network with its switches made continuous, so a jump across 0.5 no longer moves the
   output at once): the drop in log-probability of the hard prediction, alone and beside the margin in a min-p
   (the shipped combination's rule), and how many of the CW examples the margin misses it catches.
5. ``input_consistency``: the same for the shipped input-consistency score (the image's own pixels against clean
   images of the predicted class), the component that stop 35 added for these examples.

Rows are ``pathguard evaluate``'s: its fitting images (``fashion-mnist:train:val``) and their attacks from its
cache (``--cache-dir``; an attack not cached is run, which takes long), its calibration images, and the first
``--n-reference`` training images as the clean reference. No test image is read unless ``--test`` (which scores
the same variants on the evaluation images, to check the arithmetic against the report's ``clean-joint`` row).

Usage::

    .venv/bin/python -m bench.cw_misses --cache-dir cache/attacks --json reports/evaluation/cw_misses.json
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager

import numpy as np
import torch

from detector.attacks import parse_attacks
from detector.bundle import default_bundle, load_bundle
from detector.detectors.clean import NullDistribution, knn_distance
from detector.detectors.input_consistency import InputConsistencyDetector
from detector.detectors.joint import block_column_weights, knn_reference, log_margin, standardiser
from detector.detectors.selection import auroc
from detector.evaluation.adversarial import compute_all
from detector.evaluation.config import EvalConfig
from detector.evaluation.images import select_images
from detector.features import CONFIDENCE, confidence_features
from detector.splits import bundle_splits

from .helpers import emit_json

BASE = {"soft": 1.0, "logits": 1.0, "margin": 0.6}  # clean-joint's blocks and weights
VARIANTS = (
    BASE,
    {**BASE, "pooled": 0.5},
    {**BASE, "pooled": 1.0},
    {**BASE, "penultimate": 0.5},
    {**BASE, "penultimate": 1.0},
    {"pooled": 1.0, "logits": 1.0, "margin": 0.6},
    {**BASE, "margin": 1.0},
    {**BASE, "margin": 1.5},
    {"soft": 1.0, "logits": 2.0, "margin": 1.0},
)


@torch.no_grad()
def blocks(model, images: torch.Tensor, batch: int = 500) -> dict[str, np.ndarray]:
    """Per image: soft path, hard path, logits, log margin, log1p of the pooled responses and penultimate, and the
    image itself."""
    parts = []
    for s in range(0, len(images), batch):
        out = model.forward_path(images[s : s + batch])
        margin = confidence_features(out.logits)[:, CONFIDENCE.index("margin")]
        parts.append(
            {
                "soft": out.soft_path,
                "hard": out.hard_path,
                "logits": out.logits,
                "margin": margin[:, None],
                "pooled": torch.cat([layer.pooled for layer in out.layers], 1).log1p(),
                "penultimate": out.penultimate.log1p(),
                "input": images[s : s + batch].flatten(1),
            }
        )
    return {k: torch.cat([p[k] for p in parts]).double().numpy() for k in parts[0]}


def _rows(F: dict, spec: dict) -> np.ndarray:
    return np.hstack([log_margin(F[k]) if k == "margin" else F[k] for k in spec])


class JointKNN:
    """clean-joint's score (k=20, local 0.5, 2000 reference rows per class) on the blocks of ``spec``, with the
    detector's own arithmetic (:mod:`detector.detectors.joint`) applied to blocks it does not read."""

    def __init__(self, spec: dict, k: int = 20, local: float = 0.5, per_class: int = 2000) -> None:
        self.spec, self.k, self.local, self.per_class = spec, k, local, per_class

    def fit(self, F: dict) -> JointKNN:
        Z = _rows(F, self.spec)
        w = block_column_weights([F[k].shape[1] for k in self.spec], list(self.spec.values()))
        self.center, self.spread = standardiser(Z, w)
        pred = F["logits"].argmax(1)
        self.ref, self.ref_class, self.radius = knn_reference(
            (Z - self.center) / self.spread, pred, self.per_class, F["logits"].shape[1], self.k, 0
        )
        return self

    def score(self, F: dict) -> np.ndarray:
        Z = (_rows(F, self.spec) - self.center) / self.spread
        return knn_distance(Z, F["logits"].argmax(1), self.ref, self.ref_class, self.k, self.radius, self.local)


def cw_split(clean: dict, attacked: dict, calibration: dict, l2: np.ndarray) -> dict:
    """Successful CW examples below / above the clean 5% margin quantile (caught / missed by a margin test)."""
    threshold = float(np.quantile(calibration["margin"], 0.05))
    margin = attacked["margin"][:, 0]
    flipped = (attacked["hard"] != clean["hard"]).sum(1)
    out = {"margin_threshold": threshold}
    for name, rows in (("caught", margin <= threshold), ("missed", margin > threshold)):
        out[name] = {
            "n": int(rows.sum()),
            "mean_l2": float(l2[rows].mean()),
            "mean_margin": float(margin[rows].mean()),
            "mean_flipped_gates": float(flipped[rows].mean()),
            "median_flipped_gates": float(np.median(flipped[rows])),
        }
    return out


def _cells(score, calibration: dict, clean: dict, attacked: dict[str, dict]) -> dict:
    """AUROC and TPR (at the calibration images' 95% quantile of ``score``) of every attack, and the lowest TPR."""
    threshold = float(np.quantile(score(calibration), 0.95))
    s0 = score(clean)
    cells = {}
    for attack, F in attacked.items():
        s1 = score(F)
        cells[attack] = {"auroc": auroc(s0, s1), "tpr": float((s1 > threshold).mean())}
    worst = min(cells, key=lambda a: cells[a]["tpr"])
    return {"per_attack": cells, "lowest_tpr": {"attack": worst, **cells[worst]}}


def joint_blocks(reference: dict, calibration: dict, clean: dict, attacked: dict[str, dict]) -> list[dict]:
    return [
        {"blocks": spec, **_cells(JointKNN(spec).fit(reference).score, calibration, clean, attacked)}
        for spec in VARIANTS
    ]


def class_margin(reference: dict):
    """Low margin judged against the clean images *of the predicted class*: the clean-only detectors' p-value
    (:class:`~detector.detectors.clean.NullDistribution` of ``-margin``) under that class's reference margins
    alone (a class whose clean images are rarely undecided flags sooner)."""
    pred = reference["logits"].argmax(1)
    nulls = [NullDistribution(-reference["margin"][pred == c, 0]) for c in range(reference["logits"].shape[1])]

    def score(F: dict) -> np.ndarray:
        margin, p = F["margin"][:, 0], F["logits"].argmax(1)
        out = np.empty(len(margin))
        for c, null in enumerate(nulls):
            out[p == c] = null.neg_log_p(-margin[p == c])
        return out

    return score


def margin_and_gate_edges(reference: dict, calibration: dict, clean: dict, attacked: dict[str, dict]) -> dict:
    """Two more clean-only statistics against the plain low margin: the class-conditional margin, and the share
    of soft gates within ``tau`` of the switching point 0.5 (a minimal-perturbation attack that used a gate's jump
    might stop with gates on the edge, as it stops with the output on the decision boundary)."""
    scores = {"margin": lambda F: -F["margin"][:, 0], "margin_per_class": class_margin(reference)}
    for tau in (0.05, 0.2):
        scores[f"gates_within_{tau}"] = lambda F, tau=tau: (np.abs(F["soft"] - 0.5) < tau).mean(1)
    return {name: _cells(score, calibration, clean, attacked) for name, score in scores.items()}


@contextmanager
def soft_gates(model, first: int):
    """Within the block, gated layers ``first``, ``first + 1``, ... multiply by the soft gate p (not 1[p > 0.5])."""
    acms = [layer.acm for _, layer in model.gated_layers()][first:]

    def soft(acm):
        def forward(x):
            p, _ = type(acm).forward(acm, x)
            return p, p

        return forward

    for acm in acms:
        acm.forward = soft(acm)
    try:
        yield model
    finally:
        for acm in acms:
            del acm.forward


@torch.no_grad()
def soft_drops(model, images: torch.Tensor, firsts, batch: int = 500) -> dict[int, np.ndarray]:
    """Per layer ``first`` in ``firsts`` and per image: log q_hard(y) - log q_soft(y) for the hard prediction y, with
    soft gates from layer ``first`` on (the hard forward pass once per batch, one soft pass per ``first``)."""
    out: dict[int, list[torch.Tensor]] = {first: [] for first in firsts}
    for s in range(0, len(images), batch):
        x = images[s : s + batch]
        hard = model(x).log_softmax(1)
        y = hard.argmax(1, keepdim=True)
        for first in firsts:
            with soft_gates(model, first):
                soft = model(x).log_softmax(1)
            out[first].append((hard.gather(1, y) - soft.gather(1, y))[:, 0])
    return {first: torch.cat(parts).double().numpy() for first, parts in out.items()}


def _min_p(calibration: dict, names: list[str]):
    """The shipped min-p rule on statistics ``names`` (larger = less clean): each statistic's -log p under the
    first half of the calibration images; the score is their maximum."""
    half = len(calibration["margin"]) // 2
    nulls = [NullDistribution(calibration[n][:half]) for n in names]
    return lambda F: np.max([null.neg_log_p(F[n]) for null, n in zip(nulls, names)], 0)


def soft_gate_drop(model, images: dict[str, torch.Tensor], margin: dict[str, np.ndarray], firsts=(0, 3, 4, 5)) -> dict:
    """``soft_drops`` from each layer in ``firsts``, alone and in a min-p with the low margin; thresholds on the
    calibration images (the min-p's on their second half, whose first half gave its null distributions)."""
    stats = {name: {"margin": -m} for name, m in margin.items()}
    for name, x in images.items():
        stats[name].update({f"drop@{first}": d for first, d in soft_drops(model, x, firsts).items()})
    keys = {f"drop@{f}": (f"soft_from_layer_{f}", f"margin_and_soft_from_layer_{f}") for f in firsts}
    return _beside_margin(stats, keys)


def _beside_margin(stats: dict[str, dict], keys: dict[str, tuple[str, str]]) -> dict:
    """Each statistic of ``keys`` (larger = less clean; ``stats`` by image set, "calibration" and "clean" among
    them) alone, at the calibration images' 95% quantile, with the share of the CW examples a margin test misses
    that it catches, and in a min-p with the low margin, its nulls on the first half of the calibration images and
    its threshold on the second; ``keys`` names the two results of each statistic in the output."""
    stats = dict(stats)
    cal, clean = stats.pop("calibration"), stats.pop("clean")
    half = len(cal["margin"]) // 2
    second = {k: v[half:] for k, v in cal.items()}
    cw_missed = stats["cw"]["margin"] < float(np.quantile(cal["margin"], 0.95))  # high margin: a margin test misses
    out = {"cw_missed_by_margin": int(cw_missed.sum())}
    for stat, (alone_key, margin_key) in keys.items():
        alone = _cells(lambda F, stat=stat: F[stat], cal, clean, stats)
        caught = stats["cw"][stat][cw_missed] > np.quantile(cal[stat], 0.95)
        alone["cw_missed_by_margin_caught"] = float(caught.mean())
        out[alone_key] = alone
        out[margin_key] = _cells(_min_p(cal, ["margin", stat]), second, clean, stats)
    out["margin_alone_same_threshold_rows"] = _cells(_min_p(cal, ["margin"]), second, clean, stats)
    return out


def input_consistency(reference: dict, calibration: dict, clean: dict, attacked: dict[str, dict]) -> dict:
    """The shipped input-consistency score (:class:`~detector.detectors.input_consistency.InputConsistencyDetector`,
    its default settings, fitted on the reference images): alone, with the share of the CW examples a margin test
    misses that it catches, and beside the low margin in a min-p on the same threshold rows as ``soft_gates``."""
    K, D = reference["logits"].shape[1], reference["input"].shape[1]
    groups = ["logits"] * K + ["input"] * D

    def rows(F: dict) -> np.ndarray:
        return np.hstack([F["logits"], F["input"]])

    det = InputConsistencyDetector()
    det.fit(rows(reference), groups=groups, layer_sizes=[1], X_calibration=rows(calibration))
    stats = {
        name: {"input": det.raw_score(rows(F)), "margin": -F["margin"][:, 0]}
        for name, F in {"calibration": calibration, "clean": clean, **attacked}.items()
    }
    return _beside_margin(stats, {"input": ("input_alone", "margin_and_input")})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=None, help="bundle directory (default: the default bundle)")
    p.add_argument("--cache-dir", default=None, help="pathguard evaluate's attack cache")
    p.add_argument("--n-reference", type=int, default=20000)
    p.add_argument("--test", action="store_true", help="score the evaluation (test) images instead")
    p.add_argument("--json", default=None, help="write the result here too")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = EvalConfig(bundle=str(args.bundle or default_bundle()), cache_dir=args.cache_dir)
    bundle = load_bundle(cfg.bundle)
    model = bundle.model.eval()
    splits = bundle_splits(bundle.meta, None)
    sets = select_images(
        model, splits, n=cfg.n, n_fit=cfg.n_fit, n_calibration=cfg.n_calibration, n_reference=0, seed=cfg.seed
    )
    images, labels = sets.attack_images
    specs = parse_attacks(cfg.attacks)
    adv, _ = compute_all(
        model, bundle.model_digest, images, labels, specs, seed=cfg.seed, batch_size=cfg.batch_size,
        cache_dir=cfg.cache_dir, progress=False,
    )  # fmt: skip
    rows = slice(len(sets.fit.labels), None) if args.test else slice(0, len(sets.fit.labels))
    clean_images, y = images[rows], labels[rows]
    reference = blocks(model, splits.train.float_images(torch.arange(min(args.n_reference, len(splits.train)))))
    calibration, clean = blocks(model, sets.calibration.images), blocks(model, clean_images)
    attacked, split = {}, None
    soft_images = {"calibration": sets.calibration.images, "clean": clean_images}
    for spec in specs:
        x = adv[spec.label][rows]
        F = blocks(model, x)
        ok = F["logits"].argmax(1) != y.numpy()
        attacked[spec.label] = {k: v[ok] for k, v in F.items()}
        soft_images[spec.label] = x[torch.from_numpy(ok)]
        if spec.label == "cw":
            l2 = (x - clean_images).flatten(1).norm(dim=1).numpy()[ok]
            split = cw_split({k: v[ok] for k, v in clean.items()}, attacked["cw"], calibration, l2)
    result = {
        "bundle": os.path.relpath(cfg.bundle),
        "model_sha256": bundle.model_digest,
        "images": f"{'evaluation (test)' if args.test else 'fitting (validation)'} images of pathguard evaluate "
        f"({len(y)}) and their successful attacks; thresholds on its {cfg.n_calibration} calibration images; "
        f"reference: the first {args.n_reference} training images",
        "cw_split": split,
        "joint_blocks": joint_blocks(reference, calibration, clean, attacked),
        "margin_and_gate_edges": margin_and_gate_edges(reference, calibration, clean, attacked),
        "input_consistency": input_consistency(reference, calibration, clean, attacked),
        "soft_gates": soft_gate_drop(
            model,
            soft_images,
            {"calibration": calibration["margin"][:, 0], "clean": clean["margin"][:, 0]}
            | {a: F["margin"][:, 0] for a, F in attacked.items()},
        ),
    }
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
