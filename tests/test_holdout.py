"""Held-out fitting: leave-one-attack-out and leave-one-family-out never give a fit the held-out rows."""

import numpy as np
import pytest

from detector.attacks import FAMILIES, parse_attacks
from detector.evaluation.analysis import AttackOutcome, FeatureSets
from detector.evaluation.design import NoAdversarialExamples, fit_estimator, holdout_plans

SPECS = parse_attacks("fgsm,pgd,pgd:eps=0.05,apgd,pgdl2,cw,deepfool,square")


class Recorder:
    """An estimator that keeps what ``fit`` was given."""

    def fit(self, X, y, *, groups, X_calibration, **kw):
        self.X, self.y = X, y
        self.threshold_ = 0.5
        return self


def _feature_sets(n_fit=20, seed=0):
    """Column 0 of every adversarial row encodes (attack number, image index): 1000 * (i + 1) + row."""
    rng = np.random.default_rng(seed)
    fit_adv = {}
    for i, s in enumerate(SPECS):
        X = rng.normal(size=(n_fit, 3))
        X[:, 0] = 1000 * (i + 1) + np.arange(n_fit)
        fit_adv[s.label] = X
    clean = rng.normal(size=(n_fit, 3))
    clean[:, 0] = -1
    return FeatureSets(clean[:5], clean, clean, fit_adv, fit_adv, ["a", "b", "c"], 0.0)


def _outcomes(n_fit=20, seed=0):
    rng = np.random.default_rng(seed)
    return {s.label: AttackOutcome(rng.random(n_fit) < 0.7, np.ones(n_fit, bool), {}) for s in SPECS}


def test_every_family_of_the_default_matrix_is_held_out_once():
    plans = holdout_plans(SPECS)
    assert set(plans["family"]) == set(FAMILIES)
    for family, fitted_on in plans["family"].items():
        held = {s.label for s in SPECS if s.family == family}
        assert held and not held & set(fitted_on)
        assert set(fitted_on) | held == {s.label for s in SPECS}
    assert all(a not in fitted for a, fitted in plans["attack"].items())


@pytest.mark.parametrize("family", FAMILIES)
def test_leave_one_family_out_fits_on_no_row_of_the_held_out_family(family):
    feats, outcomes = _feature_sets(), _outcomes()
    fitted_on = holdout_plans(SPECS)["family"][family]
    est, record = fit_estimator(
        Recorder(),
        feats,
        outcomes,
        fitted_on,
        families={s.label: s.family for s in SPECS},
        layer_sizes=[1],
        clean_set="val",
        reference_set="train",
    )
    held = [i for i, s in enumerate(SPECS) if s.family == family]
    codes = est.X[est.y == 1, 0].astype(int)
    attack_of_row = codes // 1000 - 1
    assert not np.isin(attack_of_row, held).any()
    # exactly the successful fitting rows of every other attack, as the record says (indices, not counts)
    for i, s in enumerate(SPECS):
        if i in held:
            assert s.label not in record.adversarial
            continue
        rows = np.sort(codes[attack_of_row == i] % 1000)
        np.testing.assert_array_equal(rows, np.flatnonzero(outcomes[s.label].fit_success))
        np.testing.assert_array_equal(record.adversarial[s.label], rows)
    assert "adversarial" in record.describe() and record.to_dict()["n_clean"] == 20


def test_a_fit_with_no_successful_attack_refuses():
    feats = _feature_sets()
    outcomes = {s.label: AttackOutcome(np.zeros(20, bool), np.ones(20, bool), {}) for s in SPECS}
    with pytest.raises(NoAdversarialExamples):
        fit_estimator(
            Recorder(),
            feats,
            outcomes,
            ["fgsm"],
            families={"fgsm": "gradient-sign-linf"},
            layer_sizes=[1],
            clean_set="val",
            reference_set="train",
        )
