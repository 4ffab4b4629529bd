"""Adaptive attacks on classifier + path detector: surrogates, attacks, budgets, hardening and the CLI."""

import json

import numpy as np
import pytest
import torch
from synthetic import make_images

from detector import load_bundle
from detector.adaptive import DetectorPGD, PathMimicry, Pipeline, build_surrogate
from detector.adaptive.experiment import ADAPTIVE_ATTACKS, AdaptiveConfig, make_attack
from detector.adaptive.hardening import base_training_set, harden_detector, rows_of
from detector.adaptive.surrogate import surrogate_agreement
from detector.attacks import AttackSpec, run_attack
from detector.detectors import PathDetector
from detector.features import extract_path_features
from detector.models import ControllingModule
from detector.splits import bundle_splits

EPS = 0.15  # the tiny synthetic task needs about this much to flip a class (its squares differ by ~0.2)


@pytest.fixture(scope="module")
def parts(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    protos = bundle.prototypes()
    det = bundle.detector()
    return bundle, protos, det, Pipeline(bundle.model, protos, det, build_surrogate(det))


def _correct(model, n, seed):
    x, y = make_images(3 * n, seed=seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok][:n], y[ok][:n]


def _adversarial_rows(model, protos, x, y):
    """Feature rows of clean images and of their FGSM / PGD versions (labels 0 / 1)."""
    rows, labels = [extract_path_features(model, protos, x).X], [np.zeros(len(x))]
    for spec in (AttackSpec("fgsm", {"eps": EPS}), AttackSpec("pgd", {"eps": EPS, "steps": 5})):
        adv = run_attack(model, x, y, spec, progress=False).adversarial
        rows.append(extract_path_features(model, protos, adv).X)
        labels.append(np.ones(len(x)))
    return np.concatenate(rows), np.concatenate(labels)


def test_linear_surrogate_is_the_detector(parts):
    bundle, protos, det, pipe = parts
    x, y = _correct(bundle.model, 40, seed=31)
    X, _ = _adversarial_rows(bundle.model, protos, x, y)
    with torch.no_grad():
        s = pipe.surrogate.score(torch.as_tensor(X)).numpy()
    assert pipe.surrogate.exact
    np.testing.assert_allclose(s, det.decision_function(X), rtol=1e-5, atol=1e-9)
    assert surrogate_agreement(pipe.surrogate, det, X) > 0.9
    # the surrogate sees the threshold where the detector has it
    assert np.isclose(1 / (1 + np.exp(-pipe.surrogate.threshold_logit)), det.threshold_, rtol=1e-6)


def test_tree_surrogate_tracks_a_forest_on_held_out_rows(parts):
    bundle, protos, _, _ = parts
    groups = extract_path_features(bundle.model, protos, torch.zeros(1, 1, 16, 16)).groups
    x, y = _correct(bundle.model, 80, seed=32)
    X_fit, y_fit = _adversarial_rows(bundle.model, protos, x, y)
    forest = PathDetector(classifier="rf", n_estimators=50, random_state=0).fit(X_fit, y_fit, groups=groups)
    surrogate = build_surrogate(forest, X_fit, kind="mlp", seed=0)
    assert not surrogate.exact
    xh, yh = _correct(bundle.model, 60, seed=33)
    X_held, _ = _adversarial_rows(bundle.model, protos, xh, yh)
    rho = surrogate_agreement(surrogate, forest, X_held)
    assert rho > 0.6, f"surrogate Spearman {rho:.3f} on held-out rows"
    with pytest.raises(ValueError, match="X_fit"):
        build_surrogate(forest, None)


def test_adaptive_attack_lowers_the_detector_score(parts):
    bundle, _, det, pipe = parts
    x, y = _correct(bundle.model, 40, seed=34)
    steps = 10
    plain = run_attack(
        bundle.model, x, y, AttackSpec("pgd", {"eps": EPS, "alpha": 2.5 * EPS / steps, "steps": steps}), progress=False
    ).adversarial
    adaptive = DetectorPGD(pipe, eps=EPS, steps=steps, lam=0.3)(x, y).adversarial
    blind = DetectorPGD(pipe, eps=EPS, steps=steps, lam=0.0)(x, y).adversarial  # same loop, detector term off
    results = {}
    for name, adv in (("plain", plain), ("adaptive", adaptive), ("blind", blind)):
        pred, scores, _ = pipe.evaluate(adv)
        wrong = pred != y.numpy()
        results[name] = (scores.mean(), (wrong & (scores <= det.threshold_)).mean(), wrong.mean())
    assert results["plain"][2] > 0.5, "plain PGD should fool the classifier at this budget"
    assert results["adaptive"][0] < results["plain"][0] - 0.3, results
    assert results["adaptive"][1] > results["plain"][1] + 0.3, results
    assert results["adaptive"][1] > results["blind"][1] + 0.2, "the detector term, not iterate selection, must help"


@pytest.mark.parametrize("name", sorted(ADAPTIVE_ATTACKS))
def test_budget_and_range_are_respected(parts, name):
    bundle, _, _, pipe = parts
    model = bundle.model
    x, y = _correct(model, 12, seed=35)
    x[:, :, 0, :] = 0.0  # pixels at both ends of the range must stay in it
    x[:, :, -1, :] = 1.0
    before = [p.requires_grad for p in model.parameters()]
    model.train()
    eps = 0.05
    attack = make_attack(name, pipe, AdaptiveConfig(steps=4), eps, lam=0.5)
    adv = attack(x, y, batch_size=5).adversarial
    assert adv.shape == x.shape
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float((adv - x).abs().max()) > 0, "the attack changed nothing"
    # the attack leaves the model as it found it
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == before
    assert not any(m.straight_through for m in model.modules() if isinstance(m, ControllingModule))
    model.eval()


def test_attacks_are_seeded_per_batch(parts):
    bundle, _, _, pipe = parts
    x, y = _correct(bundle.model, 8, seed=36)
    a = PathMimicry(pipe, eps=EPS, steps=3, lam=0.5)
    full = a(x, y, batch_size=4, seed=2).adversarial
    again = a(x, y, batch_size=4, seed=2).adversarial
    assert torch.equal(full, again)
    assert not torch.equal(full, a(x, y, batch_size=4, seed=3).adversarial)


def test_bad_parameters_are_named(parts):
    pipe = parts[3]
    with pytest.raises(ValueError, match=r"eps=1.5"):
        DetectorPGD(pipe, eps=1.5)
    with pytest.raises(ValueError, match=r"lam=-1"):
        DetectorPGD(pipe, eps=0.1, lam=-1)
    with pytest.raises(ValueError, match="target=7"):
        PathMimicry(pipe, eps=0.1, target=7)
    with pytest.raises(ValueError, match="attacks="):
        AdaptiveConfig(attacks=("jsma",))
    with pytest.raises(ValueError, match=r"eps=\[0.0\]"):
        AdaptiveConfig(eps=(0.0,))


def test_hardening_starts_from_the_shipped_training_rows_and_helps(parts, tiny_bundle):
    bundle, protos, det, pipe = parts
    splits = bundle_splits(bundle.meta)
    base = base_training_set(bundle, splits, protos)
    refit = PathDetector(**det.get_params()).fit(base.X, base.y, groups=base.groups, X_calibration=base.X_calibration)
    assert np.isclose(refit.threshold_, det.threshold_, rtol=1e-6), "the rebuilt rows are not the shipped ones"
    np.testing.assert_allclose(refit.decision_function(base.X), det.decision_function(base.X), rtol=1e-6, atol=1e-9)

    attack = DetectorPGD(pipe, eps=EPS, steps=10, lam=0.3)
    hard_rows = rows_of(attack(base.fit_images, base.fit_labels).adversarial, bundle.model, protos, base.fit_labels)
    hardened = harden_detector(det, base, hard_rows)
    assert len(hard_rows) > 10
    # adaptive examples made against the shipped detector on *test* images now get flagged more often
    x, y = _correct(bundle.model, 40, seed=37)
    pred, _, X = pipe.evaluate(attack(x, y).adversarial)
    wrong = pred != y.numpy()
    before = (det.decision_function(X[wrong]) <= det.threshold_).mean()
    after = (hardened.decision_function(X[wrong]) <= hardened.threshold_).mean()
    assert before > 0.3 and after < before - 0.2, (before, after)


def test_cli_writes_a_complete_report(tiny_bundle, tmp_path):
    from pathguard.main import main

    out, saved = tmp_path / "adaptive", tmp_path / "hardened"
    rc = main(
        [
            "adaptive",
            "--bundle",
            str(tiny_bundle),
            "--n",
            "20",
            "--eps",
            "0.1,0.15",
            "--lambdas",
            "0.3",
            "--steps",
            "3",
            "--n-harden",
            "20",
            "--out",
            str(out),
            "--save-hardened",
            str(saved),
            "--quiet",
            "--threads",
            str(torch.get_num_threads()),
        ]
    )
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    assert [x["name"] for x in r["rounds"]] == ["original", "hardened"]
    expected = {("pgd", e, None) for e in (0.1, 0.15)} | {(a, e, 0.3) for a in ADAPTIVE_ATTACKS for e in (0.1, 0.15)}
    for rd in r["rounds"]:
        assert {(row["attack"], row["eps"], row["lambda"]) for row in rd["rows"]} == expected
        for row in rd["rows"]:
            assert 0 <= row["success_pipeline"] <= row["success_classifier"] <= 1
            assert row["max_linf"] <= row["eps"] + 1e-6
            assert row["auroc"] is None or 0 <= row["auroc"] <= 1
        for per in rd["summary"].values():
            assert set(per) == {"pgd", *ADAPTIVE_ATTACKS, "any"}
            assert per["any"]["success_pipeline"] >= max(p["success_pipeline"] for p in per.values())
    assert len(r["rounds"][1]["transfer"]) == 2 * len(ADAPTIVE_ATTACKS)
    assert r["images"]["eval"]["set"].endswith("test") and r["images"]["hardening"]["set"].endswith("val")
    assert set(r["headline"]) == {
        "eps",
        "original",
        "hardened",
        "original_classifier_alone",
        "hardened_classifier_alone",
        "under_half",
    }
    assert r["headline"]["eps"] == 0.1  # the goal budget, when it was run
    assert r["headline"]["hardened"] == r["rounds"][1]["summary"]["0.1"]["any"]["success_pipeline"]
    assert r["cost"]["total_upper_bound"] > 0 and r["cost"]["total_seconds"] > 0
    md = (out / "report.md").read_text()
    for text in (
        "## Headline",
        "original detector",
        "hardened detector",
        "## Hardening",
        "path mimicry",
        "detector-aware PGD",
        "plain PGD",
    ):
        assert text in md
    for fig in r["plots"]:
        assert (out / fig).stat().st_size > 1000
    # the saved copy screens with the hardened detector
    copy = load_bundle(saved)
    assert copy.screener().threshold == pytest.approx(r["rounds"][1]["threshold"])
    assert copy.part("detector")[1]["hardened"]["adaptive_rows"] == r["hardening"]["adaptive_rows"]
    assert load_bundle(tiny_bundle).screener().threshold == pytest.approx(r["rounds"][0]["threshold"])


def test_cli_attacks_a_forest_detector_through_its_surrogate(tiny_bundle, tmp_path):
    """A tree-ensemble detector has no gradient: the run fits a surrogate for each round and reports how well
    it tracks the real scores."""
    import shutil

    from detector.fitting import FitConfig, fit_bundle_detector
    from pathguard.main import main

    copy = tmp_path / "forest"
    shutil.copytree(tiny_bundle, copy)
    fit_bundle_detector(
        FitConfig(
            str(copy),
            "fgsm:eps=0.15,pgd:eps=0.15;steps=5",
            n_fit=60,
            n_calibration=60,
            classifier="rf",
            prototype_images=400,
        ),
        progress=False,
    )
    out = tmp_path / "out"
    rc = main(
        [
            "adaptive",
            "--bundle",
            str(copy),
            "--n",
            "20",
            "--eps",
            "0.15",
            "--lambdas",
            "0.3",
            "--steps",
            "3",
            "--attacks",
            "detector-pgd",
            "--n-harden",
            "20",
            "--out",
            str(out),
            "--quiet",
            "--no-plots",
            "--threads",
            str(torch.get_num_threads()),
        ]
    )
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    sur = r["detector"]["surrogate"]
    assert not sur["exact"] and sur["fitted"] == "mlp"
    assert sur["spearman_fit_rows"] > 0.6
    assert r["hardening"]["surrogate"]["exact"] is False
    assert r["detector"]["classifier"] == "rf" and len(r["rounds"]) == 2


def test_cli_attacks_the_ensemble_detector_and_hardens_it(tiny_bundle, tmp_path):
    """The default kind of detector (clean-only scores combined with weights >= 0): attacked through a fitted
    surrogate; hardening re-chooses its weights with the adaptive examples as one more family."""
    import shutil

    from detector.fitting import FitConfig, fit_bundle_detector
    from pathguard.main import main

    copy = tmp_path / "ensemble"
    shutil.copytree(tiny_bundle, copy)
    fit_bundle_detector(
        FitConfig(
            str(copy),
            "fgsm:eps=0.15,pgd:eps=0.15;steps=5,deepfool:steps=5",
            n_fit=60,
            n_calibration=60,
            classifier="ensemble",
            prototype_images=400,
        ),
        progress=False,
    )
    out = tmp_path / "out"
    rc = main(
        [
            "adaptive",
            "--bundle",
            str(copy),
            "--n",
            "20",
            "--eps",
            "0.15",
            "--lambdas",
            "0.3",
            "--steps",
            "3",
            "--attacks",
            "detector-pgd",
            "--n-harden",
            "20",
            "--out",
            str(out),
            "--quiet",
            "--no-plots",
            "--save-hardened",
            str(tmp_path / "hardened"),
            "--threads",
            str(torch.get_num_threads()),
        ]
    )
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    assert not r["detector"]["surrogate"]["exact"] and len(r["rounds"]) == 2
    hardened = load_bundle(tmp_path / "hardened").part("detector")[1]
    assert hardened["estimator"] == "PathEnsembleDetector"
    assert "adaptive" in hardened["selection"]["families"]
    assert min(hardened["selection"]["chosen"]["weights"]) >= 0
