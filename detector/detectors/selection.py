"""What the ensemble's choices are made on: validation rows, grouped by attack family, and the selection rules.

:class:`ValidationRows` holds the validation images' clean rows, their successful adversarial rows by attack
family and, optionally, noisy clean rows (Gaussian noise of the perturbation's L2 norm: negatives that look
perturbed but are not attacks). Every adversarial and noisy row names its source image (an index into
``clean``), which is what lets a selection split the *images* into a fitting half and a scoring half.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ValidationRows:
    """Validation rows for the ensemble's weights and its supervised components.

    clean : (n, F), one row per clean validation image.
    adversarial : {family: (m, F)} successful adversarial rows.
    adversarial_image : {family: (m,)} index into ``clean`` of each adversarial row's source image, or None
        (then nothing can be split by image, and no supervised component can be selected for).
    noisy : {family: (k, F)} noisy clean rows whose noise has the norm of that family's perturbations.
    noisy_image : {family: (k,)} their source images.
    """

    clean: np.ndarray
    adversarial: dict[str, np.ndarray]
    adversarial_image: dict[str, np.ndarray] | None = None
    noisy: dict[str, np.ndarray] = field(default_factory=dict)
    noisy_image: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def coerce(cls, validation) -> ValidationRows:
        """Accept a :class:`ValidationRows` or the plain ``(clean, {family: adversarial})`` pair."""
        if isinstance(validation, cls):
            return validation
        clean, adversarial = validation
        return cls(np.asarray(clean, dtype=np.float64), {f: np.asarray(a) for f, a in adversarial.items()})

    @property
    def families(self) -> list[str]:
        return sorted(f for f, a in self.adversarial.items() if len(a))

    def _mask(self, image: np.ndarray | None, rows: int, images: np.ndarray | None) -> np.ndarray:
        if images is None:
            return np.ones(rows, dtype=bool)
        if image is None:
            raise ValueError("validation rows without source images cannot be split by image")
        return np.isin(image, images)

    def adversarial_of(self, family: str, images: np.ndarray | None = None) -> np.ndarray:
        """The family's adversarial rows whose source image is in ``images`` (all when None)."""
        src = None if self.adversarial_image is None else self.adversarial_image[family]
        return self.adversarial[family][self._mask(src, len(self.adversarial[family]), images)]

    def supervised_set(
        self, families: Sequence[str], images: np.ndarray | None, seed: int
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """(X, y, counts) for a supervised fit on ``families`` and the images ``images`` (all when None):
        the clean rows, at most as many noisy rows (a seeded subset; only of ``families``, since the noise norm
        comes from their perturbations), against the families' adversarial rows."""
        clean = self.clean if images is None else self.clean[np.sort(images)]
        noisy = [
            self.noisy[f][self._mask(self.noisy_image.get(f), len(self.noisy[f]), images)]
            for f in sorted(families)
            if f in self.noisy
        ]
        noisy_rows = np.concatenate(noisy) if noisy else np.zeros((0, clean.shape[1]))
        if len(noisy_rows) > len(clean):
            keep = np.sort(np.random.default_rng(seed).permutation(len(noisy_rows))[: len(clean)])
            noisy_rows = noisy_rows[keep]
        adv = [self.adversarial_of(f, images) for f in sorted(families)]
        adv_rows = np.concatenate(adv) if adv else np.zeros((0, clean.shape[1]))
        X = np.concatenate([clean, noisy_rows, adv_rows])
        y = np.r_[np.zeros(len(clean) + len(noisy_rows)), np.ones(len(adv_rows))]
        counts = {
            "families": sorted(families),
            "n_clean": int(len(clean)),
            "n_noisy": int(len(noisy_rows)),
            "n_adversarial": int(len(adv_rows)),
        }
        return X, y, counts


def auroc(clean: np.ndarray, adversarial: np.ndarray) -> float:
    """AUROC of adversarial against clean scores (ties count one half): the Mann-Whitney statistic, computed
    exactly from integer mid-ranks. It is the value ``roc_auc_score`` gives (up to its rounding), without its
    input checks, which cost ~100x the sort at validation sizes: the weight selection takes thousands."""
    c = np.asarray(clean, dtype=np.float64).ravel()
    a = np.asarray(adversarial, dtype=np.float64).ravel()
    if not len(c) or not len(a):
        raise ValueError(f"AUROC needs clean and adversarial scores, got {len(c)} and {len(a)}")
    s = np.concatenate([c, a])
    if not np.isfinite(s).all():
        raise ValueError("AUROC of scores with NaN or infinity")
    order = np.argsort(s, kind="stable")
    v = s[order]
    starts = np.r_[0, np.flatnonzero(v[1:] != v[:-1]) + 1]
    ends = np.r_[starts[1:], len(v)]
    twice_rank = np.empty(len(s), dtype=np.int64)  # 2 x the mid-rank (1-based) of each score, an integer
    twice_rank[order] = np.repeat(starts + ends + 1, ends - starts)
    twice_u = int(twice_rank[len(c) :].sum()) - len(a) * (len(a) + 1)
    return twice_u / (2 * len(c) * len(a))


SELECT_BY = ("auroc", "tpr")
PREFER = ("fewer", "more")  # among weight vectors tied within the tolerance: fewer or more non-zero weights


def tpr_at_fpr(clean: np.ndarray, adversarial: np.ndarray, fpr: float) -> float:
    """Share of adversarial scores above the clean scores' (1 - fpr) quantile: the detection rate at a threshold
    calibrated on these clean rows."""
    return float(np.mean(np.asarray(adversarial) > np.quantile(np.asarray(clean, dtype=np.float64), 1 - fpr)))


def _weight_table(per_family, grid, combine, select_by: str, target_fpr: float) -> list[dict]:
    """Each candidate weight vector of :func:`choose_weights` with its per-family AUROC (and TPR) and the worst
    of what is selected on ("primary")."""
    n = next(iter(per_family.values()))[0].shape[1]
    table = []
    for w in itertools.product(sorted(set(grid)), repeat=n):
        w = np.asarray(w, dtype=np.float64)
        if not np.any(w > 0) or w.max() != max(grid):
            continue
        scored = {f: (combine(tc, w), combine(ta, w)) for f, (tc, ta) in per_family.items()}
        aucs = {f: auroc(c, a) for f, (c, a) in scored.items()}
        row = {"weights": w, "worst_auroc": min(aucs.values()), "mean": float(np.mean(list(aucs.values())))}
        row.update(per_family=aucs, n=int(np.sum(w > 0)), primary=row["worst_auroc"])
        if select_by == "tpr":
            row["tprs"] = {f: tpr_at_fpr(c, a, target_fpr) for f, (c, a) in scored.items()}
            row["primary"] = min(row["tprs"].values())
        table.append(row)
    return table


def choose_weights(
    per_family: dict[str, tuple[np.ndarray, np.ndarray]],
    grid: Sequence[float],
    combine: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    select_by: str = "auroc",
    target_fpr: float = 0.05,
    tolerance: float = 0.0,
    prefer: str = "fewer",
) -> tuple[np.ndarray, dict, int]:
    """Among weight vectors of ``grid ** n`` (one weight at the grid's top, scale-free), the one whose worst
    family over ``per_family`` ({family: (clean component scores, adversarial component scores)}) is best.

    ``select_by="auroc"``: highest worst AUROC; ``select_by="tpr"``: highest worst TPR at ``target_fpr``
    (threshold at the family's clean rows' quantile, as the detector is calibrated). AUROC averages over every
    threshold; the detector runs at one, and a combination can rank well overall yet lose the family's
    hardest examples at that threshold.

    Every vector whose worst metric is within ``tolerance`` of the best counts as tied; among those, ``prefer``
    ("fewer" or "more" non-zero weights) decides, then (under "tpr" the worst AUROC and) the mean AUROC, then the
    worst metric itself. ``tolerance=0`` is the plain rule exactly: the worst metric, (the worst AUROC,) the mean
    AUROC, and only then ``prefer``. A tolerance above the float noise of a refit keeps the choice from
    flipping between near-equal candidates when the thread count changes (``bench.selection_lofo``). Returns
    (weights, its table row, candidates)."""
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by={select_by!r} must be one of {SELECT_BY}")
    if prefer not in PREFER or not tolerance >= 0:
        raise ValueError(f"prefer={prefer!r} must be one of {PREFER} and tolerance={tolerance} >= 0")
    table = _weight_table(per_family, grid, combine, select_by, target_fpr)
    if not table:
        raise ValueError(f"grid={list(grid)} gives no weight vector with a positive weight")
    top = max(r["primary"] for r in table)
    tied = [r for r in table if r["primary"] >= top - tolerance]
    sign = -1 if prefer == "fewer" else 1
    then = (lambda r: (r["worst_auroc"], r["mean"])) if select_by == "tpr" else (lambda r: (r["mean"],))
    if tolerance == 0:  # the plain rule exactly: the metrics first, the number of weights last
        best = max(tied, key=lambda r: (r["primary"], *then(r), sign * r["n"]))
    else:
        best = max(tied, key=lambda r: (sign * r["n"], *then(r), r["primary"]))
    chosen = {"weights": best["weights"].tolist(), "worst_auroc": best["worst_auroc"], "per_family": best["per_family"]}
    chosen.update(best_worst=top, tolerance=tolerance, prefer=prefer, tied=len(tied))
    if select_by == "tpr":
        chosen.update(worst_tpr=best["primary"], tpr_per_family=best["tprs"], target_fpr=target_fpr)
        plain = max(table, key=lambda r: (r["worst_auroc"], r["mean"], -r["n"]))
        chosen["auroc_rule_would_choose"] = {
            "weights": plain["weights"].tolist(),
            "worst_auroc": plain["worst_auroc"],
            "worst_tpr": min(plain["tprs"].values()),
        }
    return best["weights"], chosen, len(table)


def choose_reference(table: list[dict], families: Sequence[str], tolerance: float) -> int:
    """The smallest kNN reference size whose worst AUROC over ``families`` is within ``tolerance`` of the
    best size's (``table`` rows: {"per_class": size, "per_family": {family: AUROC}, ...})."""
    known = [f for f in families if all(f in r["per_family"] for r in table)] or list(table[0]["per_family"])
    worst = {r["per_class"]: min(r["per_family"][f] for f in known) for r in table}
    top = max(worst.values())
    return min(size for size, a in worst.items() if a >= top - tolerance)


def selection_metric(selection: dict | None) -> str:
    """What an ensemble's weight selection maximised, from its record: AUROC, or TPR at the target FPR."""
    chosen = (selection or {}).get("chosen") or {}
    if "worst_tpr" in chosen:
        return f"TPR at {chosen.get('target_fpr', 0.05):.0%} FPR (then AUROC)"
    return "AUROC"
