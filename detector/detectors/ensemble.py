"""Combining path scores so that no attack-specific sign flip can be learned.

:class:`PathEnsembleDetector` combines the components' ``-log p`` (each a p-value under clean calibration
images, :class:`~detector.detectors.clean.NullDistribution`) with non-negative weights: by default the
weighted min-p rule ``max_i w_i * -log p_i`` (``combine="max"``), or the weighted Fisher sum
(``combine="fisher"``). Either is non-decreasing in every component: a component can only *raise* the
score when its own statistic departs from clean images, so whatever the weights are, no attack is ever
caught by a feature moving the "clean" way, which is what a supervised classifier fitted on over-confident
PGD outputs learns and under-confident CW outputs then exploit. The max rule was chosen over Fisher on the
validation images (worst attack 0.949 vs 0.933 AUROC for knn+summary+margin, equal weights): a sum lets a
clean image's low margin add to its path score, which dilutes the path scores against PGD.

Components are clean-only (fitted on clean reference rows, :mod:`detector.detectors.clean`) or supervised
(``"gb"``: gradient boosting on clean and noisy-clean against adversarial *validation* rows,
:class:`~detector.detectors.supervised.SupervisedComponent`); the supervised one is only ever one p-value
in the min-p, so it can add detections of attacks like those it saw but cannot flip another component.

Weights are either fixed or chosen on *validation* rows (``weights=None``): from the grid
``grid ** n_components``, the vector whose worst family is best: by default by the worst family's AUROC, or by
its TPR at the target FPR (``select_by="tpr"``). Vectors within ``weight_tolerance`` of the best worst family
are tied; ``prefer`` picks among them the one with more (or fewer) non-zero weights, then the higher mean AUROC.
The estimator's default is the plain rule (no tolerance: ties by mean AUROC, then fewer weights); ``pathguard
fit-detector --weights select`` ties within 0.002 and keeps more weights (the shipped rule of stop 31). Why: a
refit at another thread count moves the prototypes by 2e-7 and the best worst-AUROC by 0.0006, which flipped the
plain rule between near-equal vectors (joint + margin + gb at one thread, joint + gb at two); within 0.002 the
vector with most weights is the same under both (joint 1, knn 0.5, summary 0.5, margin 0.5, gb 1). Held out of
the whole selection family by family on validation images (``bench.selection_lofo``), it also generalises best
of the three: worst held-out AUROC / TPR 0.955 / 69.8%, against 0.952 / 69.4% keeping fewer and 0.943 / 65.7%
for the plain rule: among vectors the validation rows cannot tell apart, keeping every clean-only score hedges
against the family that was not seen. The TPR
rule was tried once for the default bundle: on validation it raised the worst held-out family's TPR from 80.5%
to 85.8% (AUROC 0.972 -> 0.971) by halving the supervised weight; on the test images the shipped detector then
lost on the attacks it was fitted on (FGSM AUROC 0.986 -> 0.981, CW 0.978 -> 0.963) and the evaluation's
refitted recipe chose the same weights under both rules (reports/evaluation/select-by-tpr). Those test figures
have been seen, so a further change of rule has to be argued on validation rows. With a supervised component
the rule is leave-one-family-out: for each family the supervised
component is refitted without that family's rows on half of the validation images, and the
family is scored on the other half, so the weights are chosen for attacks the supervised part never saw
(otherwise the selection would measure a seen family and always favour it). The selection record says which
families, images and rows each step used.

The shipped recipe (:func:`shipped_ensemble`, ``pathguard fit-detector``) chooses no weights: they are fixed
(:data:`SHIPPED_WEIGHTS`: the summary component at 0.5, every other at 1). Since stop 35 it has a sixth component,
input consistency (:class:`~detector.detectors.input_consistency.InputConsistencyDetector`: is the image itself
nearer to clean images of another class than to those of the class predicted?). Held out family by family on
validation rows (``bench.selection_lofo``), adding it at weight 1 raised every held-out attack's AUROC (worst
0.955 -> 0.978) and lifted CW from 86.3% to 90.2% TPR and PGD-L2 at eps 0.75 from 68.0% to 86.8%, the two that
were short of 85%; DeepFool moved from 98.9% to 98.7% (two examples of 1,000). Weight 0.75 gained less, 1.25 and
1.5 lost FGSM, PGD at eps 0.05, DeepFool and Square. The paragraph below is the choice among the five scores of
stops 33-34. Why, on validation rows only:
``bench.selection_lofo`` holds each procedure out of one family at a time and scores that family, and the target is
a TPR of 85% at 5% FPR on every attack a detector was not fitted on. Stop 32 compared equal weights with the
selection rules: equal weights left one validation attack under the target (PGD-L2 at eps 0.75, a budget that
fit-detector fits on and the evaluation does not report: 67.3%), every selection rule two or more (the tie rule
above: CW 78.9% and PGD-L2 at eps 0.75 69.8%); lowest TPR on the attacks the evaluation reports 85.4% (CW) against
78.9%. Stop 33 compared nine fixed vectors around equal weights (one or two weights raised or lowered): halving
the summary component's weight was the only one at least as good as equal weights on every held-out attack, in
AUROC and in TPR (worst AUROC 0.955 against 0.950; CW 86.3% against 85.4%, FGSM 97.1% against 95.6%). The summary
Gaussian (density, prototype distances, confidence, logits) overlaps the joint kNN and the margin, which see the
logits too; at full weight it is one more test in the min-p that every clean image may fail, which raises the
threshold for all. Raising the margin's weight catches more CW (88.6% at 1.25) but loses FGSM, PGD at eps 0.05 and
PGD-L2 (down to 89.0%; worst AUROC 0.934); raising the supervised weight (1.25, 1.5; stop 34) lifts the worst
AUROC (0.963, 0.966) but loses CW and FGSM. Fixed weights also cannot flip with the thread count, and the fit skips
the selection's held-out refits. The kNN reference size is still chosen on the validation rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from .base import FeatureDetector, threshold_at_fpr
from .clean import LayerConsistencyDetector, LowMarginDetector, PathLikelihoodDetector
from .input_consistency import InputConsistencyDetector
from .joint import PathOutputKNNDetector
from .registry import DetectorEntry, register_detector
from .selection import PREFER, SELECT_BY, ValidationRows, auroc, choose_reference, choose_weights
from .supervised import SupervisedComponent

COMPONENTS = {
    "bernoulli": lambda seed: PathLikelihoodDetector("bernoulli", random_state=seed),
    "gaussian": lambda seed: PathLikelihoodDetector("gaussian", random_state=seed),
    "knn": lambda seed: PathLikelihoodDetector("knn", standardize=True, max_reference=2000, random_state=seed),
    "layer": lambda seed: LayerConsistencyDetector(random_state=seed),
    "summary": lambda seed: PathLikelihoodDetector("gaussian", feature_groups=SUMMARY, random_state=seed),
    "margin": lambda seed: LowMarginDetector(random_state=seed),
    "joint": lambda seed: PathOutputKNNDetector(random_state=seed),
    "input": lambda seed: InputConsistencyDetector(random_state=seed),
    "gb": lambda seed: SupervisedComponent("gb", random_state=seed),
}
SUPERVISED = ("gb",)
# The shipped combination's candidates: the clean-only scores that earned a weight on validation (layer and
# bernoulli got weight 0; joint, the best single clean-only score there, python -m bench.clean_validation), the
# input-consistency score (since stop 35) and the supervised path score.
DEFAULT_COMPONENTS = ("joint", "knn", "summary", "margin", "input", "gb")
# The five of stops 31-34, before the input-consistency score (bench.selection_lofo compares with them).
STOP34_COMPONENTS = ("joint", "knn", "summary", "margin", "gb")
# Candidate kNN reference sizes (clean paths per class) for the shipped detector, chosen on validation rows.
KNN_REFERENCE_GRID = (100, 250, 500, 1000, 2000)
# The shipped weights (module docstring), fixed: summary at 0.5, every other component at 1; chosen over the
# selection rules and other fixed vectors on validation rows held out family by family (bench.selection_lofo).
SHIPPED_WEIGHT = {"summary": 0.5}


def shipped_weights(components: Sequence[str]) -> tuple[float, ...]:
    """The shipped fixed weight of each component: :data:`SHIPPED_WEIGHT`'s, else 1."""
    return tuple(SHIPPED_WEIGHT.get(c, 1.0) for c in components)


SHIPPED_WEIGHTS = shipped_weights(DEFAULT_COMPONENTS)
# The selection's ties when weights are chosen (``fit-detector --weights select``; the shipped rule of stop 31):
# vectors within 0.002 worst held-out AUROC of the best are tied, and the one keeping more non-zero weights wins.
SHIPPED_WEIGHT_TOLERANCE, SHIPPED_PREFER = 0.002, "more"
# The plain rule (no tolerance; ties by the metrics, then fewer weights): the estimator's default, and the rule of
# every detector saved before the tolerance existed.
PLAIN_TIES = {"weight_tolerance": 0.0, "prefer": "fewer"}
FIXED_RULE = "fixed weights, none chosen"  # the selection record's rule when the weights were given
COMBINE = ("fisher", "max")
SUMMARY = ("density", "proto", "confidence", "logits")
ESTIMATORS = {
    c.__name__: c
    for c in (
        PathLikelihoodDetector,
        LayerConsistencyDetector,
        LowMarginDetector,
        PathOutputKNNDetector,
        InputConsistencyDetector,
        SupervisedComponent,
    )
}


class PathEnsembleDetector(FeatureDetector):
    """Non-negative weighted combination (min-p or Fisher) of clean-only and supervised path p-values.

    Parameters
    ----------
    components : non-empty sequence of names in :data:`COMPONENTS`; those in :data:`SUPERVISED` are fitted
        on the validation rows (clean and noisy clean against adversarial), the others on clean rows only.
    weights : None (choose on validation rows in ``fit``) or one weight >= 0 per component, not all 0.
    combine : {"max", "fisher"}, the combination rule (module docstring).
    grid : candidate weights per component when ``weights`` is None (each >= 0).
    knn_reference : clean reference paths per class that the "knn" component keeps.
    knn_reference_grid : None, or candidate sizes for ``knn_reference`` chosen on the validation rows: the
        smallest whose worst per-family AUROC (kNN score alone) is within ``reference_tolerance`` of the best
        size's. A smaller reference scores faster (its cost is linear in the size) and makes a smaller bundle.
    reference_tolerance : see ``knn_reference_grid``.
    select_by : {"auroc", "tpr"}, what the weights maximise over the (held-out) families on validation rows:
        the worst family's AUROC, or its TPR at ``target_fpr`` (then worst AUROC)
        (:func:`~detector.detectors.selection.choose_weights`; the module docstring says why AUROC is the default).
    weight_tolerance, prefer : weight vectors whose worst family is within ``weight_tolerance`` of the best are
        tied; among them the one with ``prefer`` ("fewer" or "more") non-zero weights, then the higher mean AUROC.
    target_fpr, random_state : see :class:`~detector.detectors.base.FeatureDetector`.

    Attributes
    ----------
    weights_ : ndarray (n_components,), the weights used.
    selection_ : dict, how the weights (and the kNN reference size) were chosen, on which rows.
    """

    def __init__(
        self,
        components: Sequence[str] = DEFAULT_COMPONENTS,
        weights: Sequence[float] | None = None,
        grid: Sequence[float] = (0.0, 0.5, 1.0),
        combine: str = "max",
        knn_reference: int = 2000,
        knn_reference_grid: Sequence[int] | None = None,
        reference_tolerance: float = 0.005,
        select_by: str = "auroc",
        weight_tolerance: float = PLAIN_TIES["weight_tolerance"],
        prefer: str = PLAIN_TIES["prefer"],
        target_fpr: float = 0.05,
        random_state: int = 0,
    ) -> None:
        self.components = components
        self.combine = combine
        self.weights = weights
        self.grid = grid
        self.knn_reference = knn_reference
        self.knn_reference_grid = knn_reference_grid
        self.reference_tolerance = reference_tolerance
        self.select_by = select_by
        self.weight_tolerance = weight_tolerance
        self.prefer = prefer
        self.target_fpr = target_fpr
        self.random_state = random_state

    @property
    def supervised(self) -> list[int]:
        """Indices of the components fitted on adversarial validation rows."""
        return [i for i, c in enumerate(self.components) if c in SUPERVISED]

    @property
    def clean_only(self) -> bool:
        """True when nothing about the fit depends on adversarial examples (fixed weights, no supervised part)."""
        return self.weights is not None and not self.supervised

    def _check_params(self) -> None:
        if self.combine not in COMBINE:
            raise ValueError(f"combine={self.combine!r} must be one of {COMBINE}")
        if not self.components or set(self.components) - set(COMPONENTS):
            raise ValueError(f"components={list(self.components)} must be a non-empty subset of {sorted(COMPONENTS)}")
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float64)
            if w.shape != (len(self.components),) or np.any(w < 0) or not np.any(w > 0):
                raise ValueError(f"weights={list(self.weights)} must be {len(self.components)} values >= 0, not all 0")
        if not self.grid or any(g < 0 for g in self.grid) or max(self.grid) <= 0:
            raise ValueError(f"grid={list(self.grid)} must be non-empty, >= 0, with a positive value")
        sizes = [self.knn_reference, *(self.knn_reference_grid or ())]
        if any(int(s) < 1 for s in sizes) or self.reference_tolerance < 0:
            raise ValueError(f"kNN reference sizes {sizes} must be >= 1 and reference_tolerance >= 0")
        if not 0 < self.target_fpr < 1:
            raise ValueError(f"target_fpr={self.target_fpr} must be in (0, 1)")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by={self.select_by!r} must be one of {SELECT_BY}")
        if self.prefer not in PREFER or not self.weight_tolerance >= 0:
            raise ValueError(f"prefer={self.prefer!r} must be one of {PREFER}, weight_tolerance >= 0")

    def _make(self, name: str, **params):
        comp = COMPONENTS[name](self.random_state).set_params(target_fpr=self.target_fpr)
        return comp.set_params(**params) if params else comp

    def fit(
        self,
        X,
        y=None,
        *,
        groups: Sequence[str],
        layer_sizes: Sequence[int],
        X_calibration=None,
        validation: ValidationRows | tuple | None = None,
        cache: dict | None = None,
    ) -> PathEnsembleDetector:
        """Fit the clean-only components on clean rows X, the supervised ones on ``validation``, every null
        and the threshold on ``X_calibration`` (clean rows in neither).

        validation : :class:`ValidationRows` (or ``(clean rows, {family: adversarial rows})`` when no
            component is supervised) of *validation* images: what the weights, the kNN reference size and the
            supervised components are fitted on.
        cache : optional dict shared between fits: a supervised component fitted on exactly the same rows is
            taken from it instead of being fitted again (the evaluation's held-out tables refit many times).
        """
        self._check_params()
        if y is not None and np.any(np.asarray(y) != 0):
            raise ValueError("the ensemble's components are fitted on clean rows only; y must be all 0 (or None)")
        X = np.asarray(X, dtype=np.float64)
        if X_calibration is None:
            order = np.random.default_rng(self.random_state).permutation(len(X))
            cut = len(X) * 3 // 4
            X, X_calibration = X[order[:cut]], X[order[cut:]]
        X_calibration = np.asarray(X_calibration, dtype=np.float64)
        self.groups_, self.layer_sizes_ = list(groups), list(layer_sizes)
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.array([0, 1])
        self.components_: list = [None] * len(self.components)
        for i, c in enumerate(self.components):
            if c not in SUPERVISED:
                size = {"max_reference": int(self.knn_reference)} if c == "knn" else {}
                self.components_[i] = self._make(c, **size).fit(
                    X, groups=groups, layer_sizes=layer_sizes, X_calibration=X_calibration
                )
        self.reference_table_: list[dict] = []
        return self.fit_validation(validation, X_calibration, cache=cache, X_reference=X)

    def fit_validation(
        self, validation, X_calibration, *, cache: dict | None = None, X_reference=None
    ) -> PathEnsembleDetector:
        """Everything that depends on adversarial rows, again: the kNN reference size (re-chosen from the table
        ``fit`` measured, over the families of ``validation`` only; refitted from ``X_reference`` if it
        changes), the supervised components and the weights. The clean-only components are kept, so an
        ensemble already fitted on the same clean rows can be refitted for another set of attacks."""
        check_is_fitted(self, "components_")
        needs = self.weights is None or bool(self.supervised)
        if needs and (validation is None or not ValidationRows.coerce(validation).families):
            raise ValueError(
                "weights=None or a supervised component needs validation rows: pass validation=ValidationRows(...) "
                "(or (clean, {family: adversarial}))"
            )
        X_calibration = np.asarray(X_calibration, dtype=np.float64)
        val = ValidationRows.coerce(validation) if validation is not None else None
        reference = self._choose_reference(val, X_calibration, X_reference) if val is not None else None
        self.supervised_rows_: dict = {}
        for i in self.supervised:
            self.components_[i], self.supervised_rows_ = self._fit_supervised(
                i, val, val.families, None, X_calibration, cache
            )
        self.columns_ = self._read_columns()
        if self.weights is None:
            self.weights_, self.selection_ = self._select(val, X_calibration, cache)
        else:  # fixed weights: the record still says what the validation rows chose or fitted, if anything
            self.weights_ = np.asarray(self.weights, dtype=np.float64)
            chose = reference is not None or bool(self.supervised)
            self.selection_ = {"rule": FIXED_RULE, "families": val.families} if chose and val is not None else None
        if self.selection_ is not None:
            self.selection_["knn_reference"] = reference
            if self.supervised:
                self.selection_["supervised_fit"] = self.supervised_rows_
        self.calibrate(X_calibration)
        return self

    def _choose_reference(self, val: ValidationRows, X_calibration, X_reference) -> dict | None:
        """Measure (once, in ``fit``) and apply the kNN reference-size rule; None when there is no choice."""
        if not self.knn_reference_grid or "knn" not in self.components:
            return None
        i = list(self.components).index("knn")
        if not self.reference_table_:
            if X_reference is None:
                raise ValueError("choosing the kNN reference size needs the clean reference rows")
            for size in sorted({int(s) for s in self.knn_reference_grid}):
                comp = self._make("knn", max_reference=size).fit(
                    X_reference, groups=self.groups_, layer_sizes=self.layer_sizes_, X_calibration=X_calibration
                )
                clean = comp.neg_log_p(val.clean)
                per_family = {f: auroc(clean, comp.neg_log_p(val.adversarial[f])) for f in val.families}
                self.reference_table_.append(
                    {
                        "per_class": size,
                        "stored": int(len(comp.reference_)),
                        "per_family": per_family,
                    }
                )
        size = choose_reference(self.reference_table_, val.families, self.reference_tolerance)
        if int(self.components_[i].max_reference) != size:
            if X_reference is None:
                raise ValueError(f"the kNN reference size changes to {size}: pass X_reference to refit it")
            self.components_[i] = self._make("knn", max_reference=size).fit(
                X_reference, groups=self.groups_, layer_sizes=self.layer_sizes_, X_calibration=X_calibration
            )
        return {
            "rule": f"smallest per-class size (scoring cost is linear in the stored paths) whose worst per-family "
            f"AUROC of the kNN score alone on validation rows is within {self.reference_tolerance} of the best size's",
            "chosen": size,
            "families": val.families,
            "table": self.reference_table_,
        }

    def _fit_supervised(self, i: int, val: ValidationRows, families, images, X_calibration, cache):
        """Supervised component ``i`` fitted on ``families`` and ``images`` of ``val`` (from ``cache`` if it
        was fitted on the same rows before); returns (component, counts of the rows it saw)."""
        X, y, counts = val.supervised_set(families, images, self.random_state)
        if not np.any(y == 1):
            raise ValueError(f"no adversarial validation row of {list(families)} to fit {self.components[i]!r} on")
        comp = self._make(self.components[i])
        key = hashlib.sha256(
            b"".join([repr(comp.get_params()).encode(), X.tobytes(), y.tobytes(), X_calibration.tobytes()])
        ).hexdigest()
        if cache is not None and key in cache:
            return cache[key], counts
        comp.fit(X, y, groups=self.groups_, X_calibration=X_calibration)
        if cache is not None:
            cache[key] = comp
        return comp, counts

    def _read_columns(self) -> np.ndarray:
        """Every column some component reads (what a surrogate of this detector needs)."""
        return np.unique(np.concatenate([np.r_[c.columns_, c.logit_columns_] for c in self.components_]))

    def component_scores(self, X) -> np.ndarray:
        """(n, n_components) -log p of each component."""
        check_is_fitted(self, "components_")
        return np.column_stack([c.neg_log_p(X) for c in self.components_])

    def _select(self, val: ValidationRows, X_calibration, cache) -> tuple[np.ndarray, dict]:
        """Weights by the worst (leave-one-family-out) family's TPR or AUROC on the validation rows (module
        docstring, ``select_by``)."""
        families = val.families
        head = {"families": families, "n_clean": int(len(val.clean))}
        head["n_adversarial"] = {f: int(len(val.adversarial[f])) for f in families}
        metric, then = "AUROC", "mean AUROC"
        if self.select_by == "tpr":
            metric, then = f"TPR at {self.target_fpr:.0%} FPR", "worst AUROC, mean AUROC"
        ties = f"ties within {self.weight_tolerance} of the best: {self.prefer} weights, then {then}"
        if self.weight_tolerance == 0:  # choose_weights: the plain rule, the metrics before the number of weights
            ties = f"ties: {then}, then {self.prefer} weights"
        if not self.supervised:
            t_clean = self.component_scores(val.clean)
            per_family = {f: (t_clean, self.component_scores(val.adversarial[f])) for f in families}
            rule = f"max worst per-family {metric} on validation rows ({ties})"
        else:
            per_family, refits = self._held_out_scores(val, X_calibration, cache)
            head["refits"] = refits
            rule = (
                f"max worst leave-one-family-out {metric} on validation rows ({ties}): for each "
                "family, the supervised components are refitted without it on half of the validation images and "
                "scored, with the clean-only components, on the family's rows of the other half against that half's "
                "clean rows"
            )
        w, chosen, candidates = choose_weights(
            per_family,
            self.grid,
            self._combined,
            select_by=self.select_by,
            target_fpr=self.target_fpr,
            tolerance=self.weight_tolerance,
            prefer=self.prefer,
        )
        return w, {"rule": rule, **head, "chosen": chosen, "candidates": candidates}

    def _held_out_scores(self, val: ValidationRows, X_calibration, cache):
        """Per family f: component scores of the clean rows and of f's adversarial rows of the scoring half of
        the images, the supervised components fitted on the other half without any row of f."""
        if val.adversarial_image is None:
            raise ValueError("selecting weights for a supervised component needs the source image of every row")
        order = np.random.default_rng(self.random_state).permutation(len(val.clean))
        fit_images, score_images = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
        fixed = [i for i in range(len(self.components)) if i not in self.supervised]
        clean_rows = val.clean[score_images]
        t_clean = np.zeros((len(clean_rows), len(self.components)))
        t_clean[:, fixed] = np.column_stack([self.components_[i].neg_log_p(clean_rows) for i in fixed])
        per_family, refits = {}, {}
        for f in val.families:
            rows = val.adversarial_of(f, score_images)
            if not len(rows):
                continue
            tc, ta = t_clean.copy(), np.zeros((len(rows), len(self.components)))
            ta[:, fixed] = np.column_stack([self.components_[i].neg_log_p(rows) for i in fixed])
            others = [g for g in val.families if g != f]
            counts = {"families": others, "n_clean": 0, "n_noisy": 0, "n_adversarial": 0}
            if any(len(val.adversarial_of(g, fit_images)) for g in others):
                for i in self.supervised:
                    comp, counts = self._fit_supervised(i, val, others, fit_images, X_calibration, cache)
                    tc[:, i], ta[:, i] = comp.neg_log_p(clean_rows), comp.neg_log_p(rows)
            else:  # no other family to learn from: the supervised part knows no attack, so it adds nothing (-log p 0)
                counts["note"] = "no adversarial row of another family: the supervised components score 0"
            refits[f] = {**counts, "scored_clean": int(len(clean_rows)), "scored_adversarial": int(len(rows))}
            per_family[f] = (tc, ta)
        if not per_family:
            raise ValueError("no family has adversarial rows on the scoring half of the validation images")
        return per_family, refits

    def calibrate(self, X_clean) -> PathEnsembleDetector:
        self.threshold_ = threshold_at_fpr(self.decision_function(X_clean), self.target_fpr)
        return self

    def _combined(self, t: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Weighted Fisher (sum of w_i * -log p_i) or weighted min-p (max of w_i * -log p_i); both are
        non-decreasing in every component for w >= 0."""
        return t @ w if self.combine == "fisher" else (t * w).max(1)

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "weights_")
        used = np.flatnonzero(self.weights_ > 0)  # a component with weight 0 is not computed at all
        t = np.column_stack([self.components_[i].neg_log_p(X) for i in used])
        t = self._combined(t, self.weights_[used])
        return t / (1.0 + t)

    # -- persistence ------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        check_is_fitted(self, ["components_", "threshold_"])
        used = np.flatnonzero(self.weights_ > 0)  # a component with weight 0 never scores: not stored
        tensors, parts = {"weights": torch.from_numpy(self.weights_[used].copy())}, []
        for j, i in enumerate(used):
            t, info = self.components_[i].to_state()
            tensors.update({f"c{j}.{k}": v for k, v in t.items()})
            parts.append(info)
        params = self.get_params()
        params["components"] = [self.components[i] for i in used]
        params["grid"] = list(params["grid"])
        params["knn_reference_grid"] = None if self.knn_reference_grid is None else list(self.knn_reference_grid)
        if "knn" in params["components"]:  # the size chosen on validation, so that a reload says what it holds
            params["knn_reference"] = int(self.components_[list(self.components).index("knn")].max_reference)
        params["weights"] = None if params["weights"] is None else [float(params["weights"][i]) for i in used]
        return tensors, {
            "estimator": type(self).__name__,
            "params": params,
            "components": parts,
            "threshold": self.threshold_,
            "n_features_in": int(self.n_features_in_),
            "selection": self.selection_,
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict) -> PathEnsembleDetector:
        if info.get("estimator") != cls.__name__:
            raise ValueError(f"state is of a {info.get('estimator')!r}, not a {cls.__name__}")
        # detectors saved before ``select_by`` existed chose their weights by AUROC, before the tolerance exactly
        det = cls(**{"select_by": "auroc", **PLAIN_TIES, **info["params"]})
        det._check_params()
        det.components_ = []
        for i, part in enumerate(info["components"]):
            est = ESTIMATORS.get(part.get("estimator"))
            if est is None:
                raise ValueError(f"unknown component estimator {part.get('estimator')!r}")
            prefix = f"c{i}."
            det.components_.append(
                est.from_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, part)
            )
        det.columns_ = det._read_columns()
        det.weights_ = tensors["weights"].numpy()
        if np.any(det.weights_ < 0):
            raise ValueError("stored ensemble weights must be >= 0")
        det.selection_ = info.get("selection")
        det.threshold_, det.n_features_in_ = float(info["threshold"]), int(info["n_features_in"])
        det.classes_ = np.array([0, 1])
        return det


def _clean(name: str, make, description: str) -> None:
    register_detector(DetectorEntry(name, "path", make, description))


_clean(
    "clean-bernoulli",
    lambda fpr, seed: PathLikelihoodDetector("bernoulli", target_fpr=fpr, random_state=seed),
    "clean-only: per-class Bernoulli likelihood of the hard path under the predicted class",
)
_clean(
    "clean-gaussian",
    lambda fpr, seed: PathLikelihoodDetector("gaussian", target_fpr=fpr, random_state=seed),
    "clean-only: Mahalanobis distance of the soft path to its predicted class (tied, shrunk covariance)",
)
_clean(
    "clean-knn",
    lambda fpr, seed: COMPONENTS["knn"](seed).set_params(target_fpr=fpr),
    "clean-only: mean distance to the 10 nearest clean soft paths of the predicted class (standardised columns)",
)
_clean(
    "clean-layer",
    lambda fpr, seed: COMPONENTS["layer"](seed).set_params(target_fpr=fpr),
    "clean-only: layer consistency, votes of each layer's 50 nearest clean paths against the final prediction",
)
_clean(
    "clean-summary",
    lambda fpr, seed: COMPONENTS["summary"](seed).set_params(target_fpr=fpr),
    "clean-only: Mahalanobis distance of per-layer densities, prototype departures, confidence and logits to "
    "the predicted class",
)
_clean(
    "clean-margin",
    lambda fpr, seed: COMPONENTS["margin"](seed).set_params(target_fpr=fpr),
    "clean-only: low softmax margin (top-1 minus top-2 probability), one-sided; not a path score",
)
_clean(
    "clean-joint",
    lambda fpr, seed: COMPONENTS["joint"](seed).set_params(target_fpr=fpr),
    "clean-only: mean distance to the 20 nearest clean rows of the predicted class in (soft path, logits, log softmax "
    "margin), every column standardised, blocks weighted 1 : 1 : 0.6, divided by the square root of those "
    "neighbours' own 20-NN radius",
)
_clean(
    "clean-input",
    lambda fpr, seed: COMPONENTS["input"](seed).set_params(target_fpr=fpr),
    "clean-only: input consistency, the image's mean distance to its 10 nearest clean images of the predicted class "
    "minus the least such distance to another class (50 principal components of the pixels); not a path score",
)
_clean(
    "clean-ensemble",
    lambda fpr, seed: PathEnsembleDetector(
        components=("knn", "summary", "margin"), weights=(1.0, 1.0, 1.0), target_fpr=fpr, random_state=seed
    ),
    "clean-only: min-p combination (max of -log p, equal weights) of the knn, summary and margin detectors",
)


def shipped_ensemble(target_fpr: float = 0.05, random_state: int = 0) -> PathEnsembleDetector:
    """The recipe ``pathguard fit-detector`` ships and ``pathguard evaluate`` refits as ``path-ensemble``."""
    return PathEnsembleDetector(
        components=DEFAULT_COMPONENTS,
        weights=SHIPPED_WEIGHTS,
        knn_reference_grid=KNN_REFERENCE_GRID,
        weight_tolerance=SHIPPED_WEIGHT_TOLERANCE,
        prefer=SHIPPED_PREFER,
        target_fpr=target_fpr,
        random_state=random_state,
    )


register_detector(
    DetectorEntry(
        "path-ensemble",
        "path",
        lambda fpr, seed: shipped_ensemble(fpr, seed),
        "the shipped recipe: min-p combination with fixed weights (summary 0.5, the rest 1) of the joint, knn, "
        "summary, margin and input-consistency clean-only p-values and a gradient-boosted path score (fitted on "
        "clean + noisy clean vs adversarial fitting rows); the kNN reference size chosen on the validation fitting "
        "images",
        noisy_negatives=True,
    )
)
_clean(
    "path-ensemble-clean",
    lambda fpr, seed: PathEnsembleDetector(
        components=("joint", "knn", "summary", "margin", "layer", "bernoulli"), target_fpr=fpr, random_state=seed
    ),
    "min-p combination with weights >= 0 of the joint, knn, summary, margin, layer and bernoulli clean-only p-values; "
    "weights chosen by worst per-family AUROC on the validation fitting images",
)


ESTIMATOR_TYPES: dict[str, type] = {"PathEnsembleDetector": PathEnsembleDetector, **ESTIMATORS}


def detector_from_state(tensors: dict[str, torch.Tensor], info: dict):
    """Rebuild a stored detector of any kind (the ``estimator`` field of ``info`` says which)."""
    from .path import PathDetector

    kinds = {**ESTIMATOR_TYPES, "PathDetector": PathDetector}
    cls = kinds.get(info.get("estimator"))
    if cls is None:
        raise ValueError(f"stored detector is a {info.get('estimator')!r}; known: {sorted(kinds)}")
    return cls.from_state(tensors, info)
