"""The shipped ensemble with a supervised component: its weights are chosen by worst leave-one-family-out AUROC on
validation rows, the supervised part refitted without the held-out family (checked on the rows it was given and
by what the selection measures), weights stay >= 0, the kNN reference size is chosen on validation, and the
fitted detector follows the estimator contract and round-trips."""

import numpy as np
import pytest

from detector.detectors import PathEnsembleDetector, detector_from_state
from detector.detectors.selection import ValidationRows, auroc
from detector.detectors.supervised import SupervisedComponent

LAYERS = [4, 4]
GROUPS = ["soft"] * 8 + ["hard"] * 8 + ["density"] * 2 + ["proto"] * 10 + ["confidence"] * 3 + ["logits"] * 3
SHIFTED = {"fam-a": 0, "fam-b": 5}  # the soft-path column each synthetic "attack family" moves


def _clean(n, rng):
    """Synthetic path-feature rows of clean images of 3 classes."""
    y = rng.integers(3, size=n)
    soft = 0.2 * rng.normal(size=(n, 8)) + 0.3 * np.eye(3, 8)[y] + 0.5
    logits = 4.0 * np.eye(3)[y] + rng.normal(size=(n, 3))
    z = np.exp(logits - logits.max(1, keepdims=True))
    p = np.sort(z / z.sum(1, keepdims=True), axis=1)
    conf = np.column_stack([p[:, -1], p[:, -1] - p[:, -2], -(p * np.log(p)).sum(1)])
    return np.column_stack(
        [soft, (soft > 0.5).astype(float), soft.reshape(n, 2, 4).mean(2), rng.normal(size=(n, 10)), conf, logits]
    )


def _attack(clean, family, rng):
    """Rows like ``clean`` whose one soft column of ``family`` moves by 1.5 (softmax untouched: margin is blind)."""
    adv = clean.copy()
    adv[:, SHIFTED[family]] += 1.5 + 0.1 * rng.normal(size=len(adv))
    return adv


def _validation(n=240, seed=0):
    rng = np.random.default_rng(seed)
    clean = _clean(n, rng)
    adv, image, noisy, noisy_image = {}, {}, {}, {}
    for f in SHIFTED:
        ok = np.flatnonzero(rng.random(n) < 0.9)
        adv[f], image[f] = _attack(clean[ok], f, rng), ok
        noisy[f] = clean[ok] + 0.02 * rng.normal(size=clean[ok].shape)
        noisy_image[f] = ok
    return ValidationRows(clean, adv, image, noisy, noisy_image)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(1)
    reference, calibration = _clean(600, rng), _clean(300, rng)
    val = _validation()
    est = PathEnsembleDetector(components=("margin", "gb"), grid=(0.0, 1.0), random_state=0)
    est.fit(reference, groups=GROUPS, layer_sizes=LAYERS, X_calibration=calibration, validation=val)
    return est, val, rng


def _auroc(clean, adv):
    return (adv[:, None] > clean[None, :]).mean() + 0.5 * (adv[:, None] == clean[None, :]).mean()


def test_selection_refits_the_supervised_part_without_the_held_out_family(fitted):
    est, val, rng = fitted
    refits = est.selection_["refits"]
    assert set(refits) == set(SHIFTED)
    for f, r in refits.items():
        assert r["families"] == [g for g in SHIFTED if g != f]
        assert r["n_clean"] == len(val.clean) // 2 and r["n_adversarial"] > 0
    # What the selection measured is the unseen case: a supervised part fitted on one family's column never learns
    # the other's, so its held-out AUROC is near chance. Had the refit kept the held-out family, the gb-only
    # candidate would score ~1.0 here (the final fit, which saw both, does on new rows).
    assert est.selection_["chosen"]["worst_auroc"] < 0.75
    fresh = _clean(300, rng)
    final = est.components_[1]
    for f in SHIFTED:
        assert _auroc(final.neg_log_p(fresh), final.neg_log_p(_attack(fresh, f, rng))) > 0.95


def test_no_row_of_the_held_out_family_reaches_a_refit(monkeypatch):
    seen = []
    original = SupervisedComponent.fit

    def spy(self, X, y, **kw):
        seen.append({row.tobytes() for row in X[y == 1]})
        return original(self, X, y, **kw)

    monkeypatch.setattr(SupervisedComponent, "fit", spy)
    rng = np.random.default_rng(2)
    val = _validation(seed=3)
    est = PathEnsembleDetector(components=("margin", "gb"), grid=(0.0, 1.0))
    est.fit(_clean(300, rng), groups=GROUPS, layer_sizes=LAYERS, X_calibration=_clean(200, rng), validation=val)
    rows = {f: {r.tobytes() for r in a} for f, a in val.adversarial.items()}
    final, refits = seen[0], seen[1:]
    assert len(refits) == len(SHIFTED)  # the final fit on everything, then one per held-out family
    for f, fit_rows in zip(sorted(SHIFTED), refits):
        assert not fit_rows & rows[f], f"the refit for held-out {f} was given its rows"
        assert fit_rows <= set().union(*(rows[g] for g in SHIFTED if g != f))
    assert final == set().union(*rows.values())


def test_weights_are_non_negative_and_the_combination_monotone(fitted):
    est, _, rng = fitted
    assert np.all(est.weights_ >= 0) and est.weights_.max() > 0
    t = est.component_scores(_clean(50, rng))
    for i in range(t.shape[1]):
        assert np.all(est._combined(t + 5.0 * np.eye(t.shape[1])[i], est.weights_) >= est._combined(t, est.weights_))
    with pytest.raises(ValueError, match="weights"):
        PathEnsembleDetector(components=("margin", "gb"), weights=(1.0, -0.1)).fit(
            _clean(100, rng), groups=GROUPS, layer_sizes=LAYERS, validation=_validation()
        )


def test_estimator_contract_and_round_trip(fitted):
    est, _, rng = fitted
    X = np.r_[_clean(100, rng), _attack(_clean(100, rng), "fam-a", rng)]
    s = est.decision_function(X)
    assert s.shape == (200,) and np.all((s >= 0) & (s < 1))
    np.testing.assert_array_equal(est.predict(X), (s > est.threshold_).astype(int))
    np.testing.assert_allclose(est.predict_proba(X).sum(1), 1.0)
    assert not est.clean_only and "gb" in est.get_params()["components"]
    tensors, info = est.to_state()
    again = detector_from_state(tensors, info)
    np.testing.assert_allclose(again.decision_function(X), s, rtol=1e-12)
    assert again.selection_["refits"] == est.selection_["refits"]
    with pytest.raises(ValueError, match="validation"):
        PathEnsembleDetector(components=("margin", "gb"), weights=(1.0, 1.0)).fit(
            _clean(100, rng), groups=GROUPS, layer_sizes=LAYERS
        )
    with pytest.raises(ValueError, match="source image"):  # no image ids: the halves cannot be formed
        PathEnsembleDetector(components=("margin", "gb")).fit(
            _clean(100, rng), groups=GROUPS, layer_sizes=LAYERS, validation=(_clean(50, rng), {"f": _clean(50, rng)})
        )


def test_knn_reference_size_is_chosen_on_validation_and_stored():
    rng = np.random.default_rng(4)
    val = _validation(seed=5)
    est = PathEnsembleDetector(components=("knn", "margin"), grid=(0.0, 1.0), knn_reference_grid=(5, 50, 200))
    est.fit(_clean(900, rng), groups=GROUPS, layer_sizes=LAYERS, X_calibration=_clean(200, rng), validation=val)
    choice = est.selection_["knn_reference"]
    assert [r["per_class"] for r in choice["table"]] == [5, 50, 200]
    worst = {r["per_class"]: min(r["per_family"].values()) for r in choice["table"]}
    assert worst[choice["chosen"]] >= max(worst.values()) - est.reference_tolerance
    assert all(worst[s] < max(worst.values()) - est.reference_tolerance for s in worst if s < choice["chosen"])
    knn = est.components_[0]
    assert knn.max_reference == choice["chosen"] and len(knn.reference_) <= 3 * choice["chosen"]
    tensors, info = est.to_state()
    assert info["params"]["knn_reference"] == choice["chosen"]


def test_selection_auroc_is_roc_auc_score_with_ties():
    """The weight selection's rank AUROC equals scikit-learn's (to rounding), ties counting one half."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for decimals in (0, 1, 3):  # coarse rounding makes many ties within and across the two sets
        clean, adv = np.round(rng.normal(size=57), decimals), np.round(rng.normal(0.4, size=131), decimals)
        expected = roc_auc_score(np.r_[np.zeros(57), np.ones(131)], np.r_[clean, adv])
        assert auroc(clean, adv) == pytest.approx(expected, abs=1e-15)
    assert auroc(np.zeros(4), np.zeros(3)) == 0.5 and auroc(np.r_[0.0, 1.0], np.r_[2.0]) == 1.0
    for bad in ((np.zeros(0), np.ones(2)), (np.r_[0.0, np.nan], np.ones(2))):
        with pytest.raises(ValueError):
            auroc(*bad)


def test_gradient_boosting_fits_on_one_thread_give_the_threaded_trees():
    """Small gradient-boosting fits run on one OpenMP thread (detector.detectors.base): the trees are those
    of a fit on several threads."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    from detector.detectors.path import PathDetector

    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 12))
    y = (X[:, 0] + 0.5 * X[:, 3] ** 2 + rng.normal(0, 0.5, 400) > 0.5).astype(float)
    det = PathDetector(feature_groups=["soft"], classifier="gb", n_estimators=30).fit(X, y, groups=["soft"] * 12)
    with threadpool_limits(limits=2, user_api="openmp"):
        threaded = HistGradientBoostingClassifier(max_iter=30, learning_rate=0.1, early_stopping=False, random_state=0)
        threaded.fit(X, y)
    np.testing.assert_allclose(det.decision_function(X), threaded.predict_proba(X)[:, 1], rtol=1e-12, atol=0)


def test_tpr_selection_keeps_the_tail_that_auroc_averages_away():
    """Component a ranks most attacks slightly above clean (high AUROC, few past the 95% threshold); b catches
    a third of them far beyond every clean score and ranks the rest like clean. The AUROC rule takes a alone;
    the TPR rule takes b, whose detection rate at the detector's threshold is 3x higher."""
    from detector.detectors.selection import choose_weights, tpr_at_fpr

    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 1, (2000, 2))
    adv = np.column_stack([rng.uniform(0.7, 0.94, 1000), rng.uniform(0, 1, 1000)])
    adv[: 1000 // 3, 1] = 5.0
    per_family = {"f": (clean, adv)}

    def combine(t, w):
        return (t * w).max(axis=1)

    w_auc, chosen_auc, n = choose_weights(per_family, (0.0, 1.0), combine, select_by="auroc")
    w_tpr, chosen_tpr, _ = choose_weights(per_family, (0.0, 1.0), combine, select_by="tpr", target_fpr=0.05)
    assert n == 3  # (1, 0), (0, 1), (1, 1)
    assert w_auc.tolist() == [1.0, 0.0] and w_tpr.tolist() == [0.0, 1.0]
    assert chosen_tpr["worst_tpr"] == tpr_at_fpr(clean[:, 1], adv[:, 1], 0.05) > 0.33
    assert tpr_at_fpr(clean[:, 0], adv[:, 0], 0.05) < 0.05 < chosen_tpr["worst_tpr"] / 3
    assert chosen_auc["worst_auroc"] > chosen_tpr["worst_auroc"] and "worst_tpr" not in chosen_auc
    # the TPR rule's record says what the AUROC rule would have taken, and at what TPR
    other = chosen_tpr["auroc_rule_would_choose"]
    assert other["weights"] == [1.0, 0.0] and other["worst_auroc"] == chosen_auc["worst_auroc"]
    assert other["worst_tpr"] == tpr_at_fpr(clean[:, 0], adv[:, 0], 0.05)
    with pytest.raises(ValueError, match="select_by"):
        choose_weights(per_family, (0.0, 1.0), combine, select_by="f1")
    with pytest.raises(ValueError, match="select_by"):
        PathEnsembleDetector(select_by="f1").fit(
            clean, groups=["soft"] * 2, layer_sizes=[2], validation=(clean, {"f": adv})
        )


def test_weight_tolerance_ties_near_equal_vectors_and_prefers_fewer_or_more_weights():
    """Two components that are the same score up to float noise: every weight vector's worst AUROC is within
    1e-4 of the best. Without a tolerance the noise decides; within 0.002 all five vectors tie and the
    preference decides: one non-zero weight ("fewer") or two ("more"). A vector clearly worse stays out."""
    from detector.detectors.selection import auroc, choose_weights

    rng = np.random.default_rng(0)
    base_c, base_a = rng.normal(0, 1, 2000), rng.normal(1.5, 1, 1000)
    clean = np.column_stack([base_c, base_c + rng.normal(0, 1e-6, 2000), rng.normal(0, 1, 2000)])
    adv = np.column_stack([base_a, base_a + rng.normal(0, 1e-6, 1000), rng.normal(0, 1, 1000)])
    per_family = {"f": (clean, adv)}

    def combine(t, w):
        return (t * w).max(axis=1)

    grid = (0.0, 0.5, 1.0)
    table = {}
    for w in [(a, b, c) for a in grid for b in grid for c in grid if max(a, b, c) == 1.0]:
        table[w] = auroc(combine(clean, np.asarray(w)), combine(adv, np.asarray(w)))
    w0, plain, n = choose_weights(per_family, grid, combine)
    assert n == len(table) and plain["worst_auroc"] == max(table.values()) and plain["tied"] >= 1
    near = [w for w, a in table.items() if a >= max(table.values()) - 0.002]
    assert set(near) == {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0), (1.0, 0.5, 0.0), (0.5, 1.0, 0.0)}
    w_few, few, _ = choose_weights(per_family, grid, combine, tolerance=0.002, prefer="fewer")
    w_more, more, _ = choose_weights(per_family, grid, combine, tolerance=0.002, prefer="more")
    assert tuple(w_few.tolist()) in near and int((w_few > 0).sum()) == 1
    assert tuple(w_more.tolist()) in near and int((w_more > 0).sum()) == 2
    assert few["tied"] == more["tied"] == 5 and few["best_worst"] == plain["worst_auroc"]
    assert more["tolerance"] == 0.002 and more["prefer"] == "more"
    with pytest.raises(ValueError, match="prefer"):
        choose_weights(per_family, grid, combine, prefer="most")
    with pytest.raises(ValueError, match="prefer"):
        choose_weights(per_family, grid, combine, tolerance=-0.1)
    with pytest.raises(ValueError, match="prefer"):
        PathEnsembleDetector(prefer="most").fit(
            clean, groups=["soft"] * 3, layer_sizes=[3], validation=(clean, {"f": adv})
        )
