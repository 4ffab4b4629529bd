"""What each detector fit sees: training rows, held-out plans (leave one attack / family out), fitting sets.

Every fit of the evaluation goes through :func:`fit_estimator`, which returns the fitted estimator and a
:class:`FitRecord` naming exactly which rows it was given (clean fitting rows, and per attack the indices
of the fitting images whose successful adversarial versions were used). The held-out tables pass the
attacks to *exclude*; the record is what the tests check: no held-out attack's rows reach a fit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from ..attacks import FAMILIES, AttackSpec


class NoAdversarialExamples(ValueError):
    """No successful adversarial example to fit a detector on."""


@dataclass
class FitRecord:
    """Which rows a fit was given."""

    # "supervised", "clean-only", "clean-only + weights on validation", "clean-only + supervised on validation"
    # (fixed weights) or "clean-only + supervised and weights on validation"
    kind: str
    n_clean: int
    clean_set: str
    adversarial: dict[str, np.ndarray] = field(default_factory=dict)  # attack -> fitting-image indices
    n_noisy: int = 0

    @property
    def seen(self) -> set[str]:
        return set(self.adversarial)

    def describe(self) -> str:
        if not self.adversarial:
            return f"{self.n_clean} clean {self.clean_set} images; no adversarial example"
        adv = sum(len(v) for v in self.adversarial.values())
        noisy = f" + {self.n_noisy} noisy clean" if self.n_noisy else ""
        head = ""
        if self.kind.endswith("validation"):
            head = {
                "clean-only + supervised on validation": "supervised part fitted on ",
                "clean-only + supervised and weights on validation": "supervised part and weights fitted on ",
            }.get(self.kind, "weights chosen on ")
        return (
            f"{head}{self.n_clean} clean {self.clean_set}{noisy} + {adv} adversarial "
            f"({', '.join(sorted(self.adversarial))})"
        )

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "n_clean": self.n_clean,
            "clean_set": self.clean_set,
            "n_noisy": self.n_noisy,
            "adversarial": {a: int(len(v)) for a, v in self.adversarial.items()},
            "text": self.describe(),
        }


def holdout_plans(specs: list[AttackSpec]) -> dict[str, dict[str, list[str]]]:
    """{"attack": {held attack: [attacks fitted on]}, "family": {held family: [attacks fitted on]}};
    families with no attack in ``specs`` are left out."""
    labels = [s.label for s in specs]
    by_family = {f: [s.label for s in specs if s.family == f] for f in FAMILIES}
    return {
        "attack": {a: [b for b in labels if b != a] for a in labels},
        "family": {f: [b for b in labels if b not in held] for f, held in by_family.items() if held},
    }


def family_of(specs: list[AttackSpec]) -> dict[str, str]:
    return {s.label: s.family for s in specs}


def adversarial_rows(outcomes: dict, attacks: list[str]) -> dict[str, np.ndarray]:
    """Per attack, indices of the fitting images whose adversarial version succeeded."""
    return {a: np.flatnonzero(outcomes[a].fit_success) for a in attacks}


def validation_rows(feats, rows: dict[str, np.ndarray], families: dict[str, str]):
    """The ensemble's :class:`~detector.detectors.selection.ValidationRows`: the clean fitting rows, and per
    family the successful adversarial rows of the attacks in ``rows`` (attack -> fitting-image indices) with
    their source images, and the noisy twins of those images when ``feats.fit_noisy`` holds them."""
    from ..detectors.selection import ValidationRows

    adv: dict[str, list] = {}
    noisy: dict[str, list] = {}
    for a, r in rows.items():
        adv.setdefault(families[a], []).append((feats.fit_adv[a][r], r))
        if a in feats.fit_noisy:
            noisy.setdefault(families[a], []).append((feats.fit_noisy[a][r], r))

    def rows_of(blocks):
        return {f: np.concatenate([x for x, _ in b]) for f, b in blocks.items()}

    def images_of(blocks):
        return {f: np.concatenate([i for _, i in b]) for f, b in blocks.items()}

    return ValidationRows(feats.fit_clean, rows_of(adv), images_of(adv), rows_of(noisy), images_of(noisy))


def fit_estimator(
    est,
    feats,
    outcomes: dict,
    attacks: list[str],
    *,
    families: dict[str, str],
    layer_sizes: list[int],
    clean_set: str,
    reference_set: str,
    reuse=None,
    cache: dict | None = None,
):
    """Fit ``est`` on the rows ``attacks`` allow; returns (estimator, :class:`FitRecord`).

    Clean-only estimators (``est.clean_only``) get the clean reference rows; the ensemble with weights to
    choose gets them plus, as validation, the clean fitting rows and the successful adversarial rows of
    ``attacks`` grouped by family; supervised estimators get clean fitting rows (plus noisy ones when
    ``feats.fit_noisy`` holds them) against the successful adversarial rows of ``attacks``. ``reuse``: an
    ensemble of the same parameters already fitted on the same clean rows, whose clean-only components are kept
    (they never depend on ``attacks``); its supervised components, kNN reference size and weights are fitted
    again on ``attacks`` only. ``cache``: shared between the ensemble's fits (supervised components fitted on
    identical rows are reused).
    """
    if getattr(est, "clean_only", False):
        est.fit(feats.reference, groups=feats.groups, layer_sizes=layer_sizes, X_calibration=feats.calibration)
        return est, FitRecord("clean-only", len(feats.reference), reference_set)
    rows = {a: r for a, r in adversarial_rows(outcomes, attacks).items() if len(r)}
    if not rows:
        raise NoAdversarialExamples(f"none of the attacks {attacks} succeeded on the fitting images")
    if hasattr(est, "components"):  # the ensemble: clean-only components, the rest on validation rows
        return _fit_ensemble(est, feats, rows, families, layer_sizes, clean_set, reuse, cache)
    negatives = [feats.fit_clean]
    n_noisy = 0
    if feats.fit_noisy:
        noisy = [feats.fit_noisy[a][r] for a, r in rows.items()]
        n_noisy = sum(len(b) for b in noisy)
        negatives += noisy
    X = np.concatenate(negatives + [feats.fit_adv[a][r] for a, r in rows.items()])
    n_neg = sum(len(b) for b in negatives)
    y = np.r_[np.zeros(n_neg), np.ones(len(X) - n_neg)]
    extra = {"names": feats.names} if getattr(est, "classifier", None) == "select" else {}
    est.fit(X, y, groups=feats.groups, X_calibration=feats.calibration, **extra)
    return est, FitRecord("supervised", len(feats.fit_clean), clean_set, rows, n_noisy)


def _fit_ensemble(est, feats, rows: dict[str, np.ndarray], families, layer_sizes, clean_set: str, reuse, cache):
    """:func:`fit_estimator` for the ensemble: clean-only components on the reference rows (kept from ``reuse``
    when it has the same parameters), supervised components, kNN reference size and weights on ``rows``."""
    validation = validation_rows(feats, rows, families)
    if reuse is not None and reuse.get_params() == est.get_params():
        est = copy.copy(reuse)
        est.components_ = list(reuse.components_)
        est.fit_validation(validation, feats.calibration, cache=cache, X_reference=feats.reference)
    else:
        est.fit(
            feats.reference,
            groups=feats.groups,
            layer_sizes=layer_sizes,
            X_calibration=feats.calibration,
            validation=validation,
            cache=cache,
        )
    kind = "clean-only + " + ("supervised and weights" if est.supervised else "weights") + " on validation"
    if est.supervised and est.weights is not None:  # fixed weights: only the supervised part learns from rows
        kind = "clean-only + supervised on validation"
    n_noisy = int(est.supervised_rows_["n_noisy"]) if est.supervised else 0
    return est, FitRecord(kind, len(feats.fit_clean), clean_set, rows, n_noisy)
