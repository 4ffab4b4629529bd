"""The estimator contract of the detectors, persistence without pickle, and calibration."""

import numpy as np
import pytest
from safetensors.numpy import load_file as np_load  # noqa: F401  (safetensors must be importable)
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from detector.bundle import load_bundle, write_part
from detector.detectors import FeatureDetector, PathDetector, threshold_at_fpr
from detector.detectors.scorers import export_scorer


def _data(n=400, d=6, seed=0):
    rng = np.random.default_rng(seed)
    X = np.r_[rng.normal(0, 1, (n, d)), rng.normal(1.0, 1, (n, d))]
    y = np.r_[np.zeros(n), np.ones(n)]
    return X, y


@pytest.mark.parametrize(
    "model",
    [
        make_pipeline(StandardScaler(), LogisticRegression()),
        RandomForestClassifier(n_estimators=15, random_state=0),
        HistGradientBoostingClassifier(max_iter=20, random_state=0),
    ],
)
def test_exported_scorer_matches_sklearn(model):
    X, y = _data()
    model.fit(X, y)
    np.testing.assert_allclose(export_scorer(model)(X), model.predict_proba(X)[:, 1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("classifier", ["logreg", "rf", "gb"])
def test_contract(classifier):
    X, y = _data()
    det = FeatureDetector(classifier=classifier, n_estimators=20)
    with pytest.raises(NotFittedError):
        det.decision_function(X)
    assert det.fit(X, y) is det
    s = det.decision_function(X)
    assert s.shape == (len(X),) and s.min() >= 0 and s.max() <= 1
    np.testing.assert_array_equal(det.predict(X), (s > det.threshold_).astype(int))
    np.testing.assert_allclose(det.predict_proba(X).sum(1), 1.0)
    np.testing.assert_allclose(det.predict_proba(X)[:, 1], s)
    with pytest.raises(ValueError, match="features"):
        det.decision_function(X[:, :3])
    assert s[y == 1].mean() > s[y == 0].mean()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"classifier": "svm"}, "classifier='svm'"),
        ({"target_fpr": 1.5}, "target_fpr=1.5"),
        ({"C": 0}, "C=0"),
        ({"n_estimators": 0}, "n_estimators=0"),
    ],
)
def test_bad_params_named(kwargs, match):
    X, y = _data()
    with pytest.raises(ValueError, match=match):
        FeatureDetector(**kwargs).fit(X, y)


def test_fit_needs_both_classes_and_groups():
    X, y = _data()
    with pytest.raises(ValueError, match="both labels"):
        FeatureDetector().fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="groups="):
        PathDetector().fit(X, y)
    with pytest.raises(ValueError, match="feature_groups"):
        PathDetector(feature_groups=["pixels"]).fit(X, y, groups=["soft"] * 6)


def test_path_detector_selects_groups():
    X, y = _data()
    X[:, 3:] = np.random.default_rng(1).normal(size=(len(X), 3))  # the "hard" half carries no signal
    groups = ["soft"] * 3 + ["hard"] * 3
    soft = PathDetector(feature_groups=["soft"]).fit(X, y, groups=groups)
    hard = PathDetector(feature_groups=["hard"]).fit(X, y, groups=groups)
    assert soft.columns_.tolist() == [0, 1, 2]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, soft.decision_function(X)) > 0.7 > roc_auc_score(y, hard.decision_function(X))


def test_calibration_hits_target_fpr_on_held_out_clean():
    rng = np.random.default_rng(0)
    X, y = _data(n=2000)
    det = FeatureDetector(target_fpr=0.05).fit(X, y, X_calibration=rng.normal(0, 1, (4000, 6)))
    held_out = rng.normal(0, 1, (20000, 6))
    fpr = det.predict(held_out).mean()
    assert abs(fpr - 0.05) < 0.01  # binomial sd at n=4000 is 0.0034
    assert threshold_at_fpr(np.arange(100.0), 0.05) == 94.0  # 5 of 100 scores lie above


@pytest.mark.parametrize("classifier", ["logreg", "rf", "gb"])
def test_round_trip_through_bundle_identical(tiny_bundle, tmp_path, classifier):
    import shutil

    X, y = _data()
    groups = ["soft", "hard", "density", "proto", "confidence", "confidence"]
    det = PathDetector(feature_groups=["soft", "proto", "confidence"], classifier=classifier, n_estimators=20).fit(
        X, y, groups=groups
    )
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    write_part(copy, "detector", tensors=det.to_state()[0], info=det.to_state()[1])
    loaded = load_bundle(copy).detector()
    np.testing.assert_array_equal(loaded.decision_function(X), det.decision_function(X))
    assert loaded.threshold_ == det.threshold_ and loaded.get_params() == det.get_params()
