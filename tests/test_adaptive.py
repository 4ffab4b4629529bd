"""Adaptive attacks on classifier + path detector: surrogates and relaxations, attacks, budgets, sanity checks,
hardening and the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from synthetic import correct_images

from detector import load_bundle
from detector.adaptive import (
    DetectorPGD,
    IterateSurrogate,
    PathMimicry,
    Pipeline,
    SelectivePGD,
    SoftPValues,
    SoftTrees,
    build_surrogate,
    relax,
    sanity_checks,
)
from detector.adaptive.experiment import ADAPTIVE_ATTACKS, AdaptiveConfig, Round, make_attack, summarize
from detector.adaptive.hardening import base_training_set, harden_detector, rows_of
from detector.adaptive.report import render_markdown
from detector.adaptive.surrogate import surrogate_agreement
from detector.attacks import AttackSpec, run_attack
from detector.detectors import PathDetector, PathEnsembleDetector
from detector.detectors.ensemble import SUPERVISED
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
    x, y = correct_images(bundle.model, 40, seed=31)
    X, _ = _adversarial_rows(bundle.model, protos, x, y)
    with torch.no_grad():
        s = pipe.surrogate.score(torch.as_tensor(X)).numpy()
    assert pipe.surrogate.exact
    np.testing.assert_allclose(s, det.decision_function(X), rtol=1e-5, atol=1e-9)
    assert surrogate_agreement(pipe.surrogate, det, X) > 0.9
    # the surrogate sees the threshold where the detector has it
    assert np.isclose(1 / (1 + np.exp(-pipe.surrogate.threshold_logit)), det.threshold_, rtol=1e-6)


@pytest.fixture(scope="module")
def rows(parts):
    """Clean + FGSM/PGD feature rows of 80 images (labels), their groups, and the model's layer sizes."""
    bundle, protos, _, _ = parts
    groups = extract_path_features(bundle.model, protos, torch.zeros(1, 1, 16, 16)).groups
    x, y = correct_images(bundle.model, 80, seed=32)
    X, labels = _adversarial_rows(bundle.model, protos, x, y)
    return X, labels, groups, [int(s) for s in protos.layer_sizes]


def _split_gap(trees, X: np.ndarray) -> np.ndarray:
    """(n,): each row's smallest |x - t| over the splits its paths through the trees visit."""
    rows = np.arange(len(X))[:, None]
    node = np.broadcast_to(trees.roots, (len(X), len(trees.roots))).copy()
    gap = np.full(len(X), np.inf)
    for _ in range(trees.max_depth):
        value, thr, inner = X[rows, trees.feature[node]], trees.threshold[node], ~trees.is_leaf[node]
        gap = np.minimum(gap, np.where(inner, np.abs(value - thr), np.inf).min(1))
        node = np.where(inner, np.where(value <= thr, trees.left[node], trees.right[node]), node)
    return gap


@pytest.mark.parametrize("classifier", ["gb", "rf"])
def test_soft_trees_match_the_trees_as_tau_goes_to_zero(rows, classifier):
    X, labels, groups, _ = rows
    det = PathDetector(classifier=classifier, n_estimators=40, random_state=0).fit(X, labels, groups=groups)
    soft = relax(det, X[labels == 0])
    assert isinstance(soft, SoftTrees)
    real = det.decision_function(X)
    # rows within float rounding of a split (features are float32 values, thresholds their midpoints) or
    # scored exactly at the threshold are ties at any tau; every other row must converge
    clear = (_split_gap(det.scorer_, X[:, det.columns_]) > 1e-6) & (np.abs(real - det.threshold_) > 1e-9)
    assert clear.mean() > 0.5, clear.mean()  # saturated features (max probability 1.0) sit next to splits
    target = np.clip(real, 1e-4, 1 - 1e-4)  # a forest's 0 and 1 become finite logits
    errors = []
    for tau in (1.0, 0.1, 0.01, 1e-4, 1e-8):
        soft.tau = tau
        with torch.no_grad():
            s = soft.score(torch.as_tensor(X)).numpy()
        errors.append(np.abs(s - target)[clear].max())
    assert errors[0] > 1e-3, "at a large tau the relaxation should be smooth, not the trees"
    assert errors[-1] < 1e-6, errors
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    np.testing.assert_array_equal((s > det.threshold_)[clear], (real > det.threshold_)[clear])
    # annealing goes from the smooth end to the sharp end
    soft.anneal(0.0)
    assert soft.tau == soft.tau_start
    soft.anneal(1.0)
    assert soft.tau == pytest.approx(soft.tau_end)
    # and the gradient reaches the features
    soft.anneal(0.0)
    Xt = torch.as_tensor(X[labels == 1][:10]).requires_grad_(True)
    soft.logit(Xt).sum().backward()
    assert Xt.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "components,weights",
    [
        (("knn", "summary", "margin", "bernoulli"), (1, 1, 1, 0.5)),
        (("joint", "margin"), (1, 0.5)),
        (("input", "margin"), (1, 0.5)),
    ],
)
def test_soft_p_values_are_the_ensemble_where_it_flags(rows, components, weights):
    X, labels, groups, sizes = rows
    clean = X[labels == 0]
    det = PathEnsembleDetector(components=components, weights=weights).fit(clean, groups=groups, layer_sizes=sizes)
    soft = relax(det)
    assert isinstance(soft, SoftPValues) and soft.exact
    real = det.decision_function(X)
    Xt = torch.as_tensor(X).requires_grad_(True)
    z = soft.logit(Xt)
    s = torch.sigmoid(z).detach().numpy()
    flagged = real > det.threshold_
    assert flagged.sum() > 10
    np.testing.assert_allclose(s[flagged], real[flagged], rtol=1e-4)  # the tails, where it flags (kNN: float32)
    clear = np.abs(real - det.threshold_) > 1e-6
    np.testing.assert_array_equal((z.detach().numpy() > soft.threshold_logit)[clear], flagged[clear])
    z[flagged].sum().backward()
    assert Xt.grad[flagged].abs().sum() > 0


def test_the_shipped_kind_of_ensemble_relaxes_with_its_supervised_trees(rows):
    """Clean-only scores plus gradient boosting (the shipped kind): p-value tails around sigmoid-split trees, which
    anneal to the real trees, so at the end of an attack the relaxation scores every row like the detector."""
    X, labels, groups, sizes = rows
    clean, adv = X[labels == 0], X[labels == 1]
    half = len(clean) // 2
    det = PathEnsembleDetector(components=("joint", "margin", "input", "gb"), weights=(1, 1, 1, 1)).fit(
        clean[:half], groups=groups, layer_sizes=sizes, X_calibration=clean[half:], validation=(clean, {"f": adv})
    )
    soft = relax(det)
    assert isinstance(soft, SoftPValues) and not soft.exact
    assert soft.describe()["components"][-1] == "supervised trees, sigmoid splits"
    soft.anneal(1.0)
    Xt = torch.as_tensor(X).requires_grad_(True)
    z = soft.logit(Xt)
    real = det.decision_function(X)
    # it ranks the rows like the detector (Spearman, the agreement the adaptive report states). Not Pearson on the
    # score: on a tiny model whose confidence columns saturate (max probability within 1e-4 of 1), the trees split
    # them closer than tau_end times the unit, those splits stay half-open and lift every score together (Pearson
    # 0.78, Spearman 0.97 on the tiny model of stop 36)
    assert spearmanr(z.detach().numpy(), real)[0] > 0.95
    z.sum().backward()
    assert Xt.grad[:, det.components_[3].columns_].abs().sum() > 0  # the trees pass a gradient to their columns
    soft.parts[-1].trees.tau = 1e-6  # as the splits turn hard, the relaxation decides like the detector
    with torch.no_grad():
        z = soft.logit(torch.as_tensor(X)).numpy()
    assert ((z > soft.threshold_logit) == (real > det.threshold_)).mean() > 0.98


def test_a_component_without_relaxation_leaves_the_attack_its_fallback(rows):
    """Votes of neighbours (the layer-consistency component) have no smooth relaxation."""
    X, labels, groups, sizes = rows
    clean = X[labels == 0]
    layer = PathEnsembleDetector(components=("knn", "layer"), weights=(1, 1)).fit(
        clean, groups=groups, layer_sizes=sizes
    )
    assert relax(layer) is None
    assert isinstance(build_surrogate(layer, clean), IterateSurrogate)


def test_iterate_surrogate_learns_the_rows_it_is_shown(rows):
    """The fallback is refitted on what the attack visits, labelled by the real detector's scores."""
    X, labels, groups, _ = rows
    forest = PathDetector(classifier="rf", n_estimators=40, random_state=0).fit(X, labels, groups=groups)
    sur = build_surrogate(forest, X[labels == 0], kind="iterates", seed=0)
    assert isinstance(sur, IterateSurrogate) and not sur.exact
    adv = X[labels == 1]
    before = surrogate_agreement(sur, forest, X)
    for _ in range(2 * sur.refit_every):
        sur.observe(torch.as_tensor(adv), forest.decision_function(adv))
    after = surrogate_agreement(sur, forest, X)
    assert after > 0.6 and after > before, (before, after)
    sur.reset()  # a new batch starts from the clean rows again
    assert surrogate_agreement(sur, forest, X) < after


def test_adaptive_attack_lowers_the_detector_score(parts):
    bundle, _, det, pipe = parts
    x, y = correct_images(bundle.model, 40, seed=34)
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
    x, y = correct_images(model, 12, seed=35)
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


@pytest.mark.parametrize("name", sorted(ADAPTIVE_ATTACKS))
def test_a_large_budget_widens_the_ball_not_the_steps(parts, name):
    """With step_eps, eps 0.3 takes eps 0.1's step sizes and random start, yet may use the whole 0.3 ball."""
    bundle, _, _, pipe = parts
    x, y = correct_images(bundle.model, 6, seed=41)
    cfg = AdaptiveConfig(steps=60, step_eps=0.1)
    small, large = make_attack(name, pipe, cfg, 0.1, lam=0.5), make_attack(name, pipe, cfg, 0.3, lam=0.5)
    assert (small.step_eps, large.step_eps, large.eps) == (0.1, 0.1, 0.3)
    assert small.scales() == [0.1] and large.scales() == [0.1, 0.3]  # a second, wide pass for what is left
    if isinstance(large, SelectivePGD):
        assert [large.step_size(s) for s in (0, 30, 59)] == [small.step_size(s) for s in (0, 30, 59)]
        assert large.step_size(0) == pytest.approx(0.1 / 4)
    else:
        assert large.alpha == small.alpha == pytest.approx(2.5 * 0.1 / 60)
    assert make_attack(name, pipe, AdaptiveConfig(steps=60, step_eps=0.5), 0.3, lam=0.5).scales() == [0.3]
    res = large(x, y, batch_size=6)
    assert float((res.adversarial - x).abs().max()) <= 0.3 + 1e-6
    # the wide pass only adds: every image the fine pass alone gets through, both passes get through
    fine_only = make_attack(name, pipe, cfg, 0.3, lam=0.5)
    fine_only.scales = lambda: [0.1]
    first = fine_only(x, y, batch_size=6)
    assert first.found_at is not None and res.found_at is not None
    through_first, through_both = first.found_at >= 0, res.found_at >= 0
    assert bool((through_both | ~through_first).all()), (through_first, through_both)
    with pytest.raises(ValueError, match="step_eps=0"):
        AdaptiveConfig(step_eps=0.0)


def test_attacks_are_seeded_per_batch(parts):
    bundle, _, _, pipe = parts
    x, y = correct_images(bundle.model, 8, seed=36)
    a = PathMimicry(pipe, eps=EPS, steps=3, lam=0.5)
    full = a(x, y, batch_size=4, seed=2).adversarial
    again = a(x, y, batch_size=4, seed=2).adversarial
    assert torch.equal(full, again)
    assert not torch.equal(full, a(x, y, batch_size=4, seed=3).adversarial)


def test_selective_pgd_gets_everything_through_an_exact_detector(parts):
    """With an exactly differentiable detector and a budget large enough to change any class, a working attack
    gets (nearly) every image past classifier and detector; the first evading iterate is kept."""
    bundle, _, det, pipe = parts
    x, y = correct_images(bundle.model, 40, seed=38)
    for modes in (("selective",), ("orthogonal",)):
        res = SelectivePGD(pipe, eps=0.3, steps=30, restarts=1, modes=modes)(x, y)
        pred, scores, _ = pipe.evaluate(res.adversarial)
        evades = (pred != y.numpy()) & (scores <= det.threshold_)
        assert evades.mean() >= 0.95, (modes, evades.mean())
        assert float((res.adversarial - x).abs().max()) <= 0.3 + 1e-6
        np.testing.assert_array_equal(res.found_at.numpy() >= 0, evades)


def test_success_at_eps_counts_every_smaller_budget():
    """Per image, success at eps is the union over budgets <= eps, so it never falls, however the per-budget
    figures move."""
    cfg = AdaptiveConfig(eps=(0.05, 0.1, 0.3), attacks=("selective",))
    rnd = Round("original", None, clean_scores=np.zeros(4))
    per_budget = {0.05: [1, 1, 0, 0], 0.1: [0, 0, 1, 0], 0.3: [0, 0, 0, 1]}  # a broken attack: 50%, 25%, 25%
    for eps, e in per_budget.items():
        rnd.evades[("selective", eps, None)] = np.array(e, dtype=bool)
        rnd.wrong[("selective", eps, None)] = np.ones(4, dtype=bool)
    summary = summarize(rnd, cfg)
    assert [summary[str(e)]["selective"]["success_pipeline"] for e in cfg.eps] == [0.5, 0.25, 0.25]
    assert [summary[str(e)]["selective"]["success_upto"] for e in cfg.eps] == [0.5, 0.75, 1.0]
    assert [summary[str(e)]["any"]["success_upto"] for e in cfg.eps] == [0.5, 0.75, 1.0]


def _summary(aware: list[float], unaware: list[float], upto: list[float] | None = None) -> dict:
    eps = ("0.03", "0.05", "0.1", "0.3")
    upto = upto or list(np.maximum.accumulate(aware))
    return {
        e: {
            "selective": {"success_pipeline": a, "success_upto": u},
            "mimicry": {"success_pipeline": m, "success_upto": m},
        }
        for e, a, u, m in zip(eps, aware, upto, unaware, strict=True)
    }


def test_sanity_checks_pass_a_sound_attack_and_fail_broken_ones():
    good = _summary([0.6, 0.8, 0.97, 1.0], [0.5, 0.6, 0.7, 0.9])
    steps = {"attack": "selective", "eps": 0.1, "steps": [25, 100], "success": [0.9, 0.97]}
    ok = sanity_checks(good, steps, aware=["selective"], unaware=["mimicry"], n=500)
    assert ok["passed"] and all(c["passed"] for c in ok["checks"])

    def failed(summary, steps_check=steps):
        r = sanity_checks(summary, steps_check, aware=["selective"], unaware=["mimicry"], n=500)
        assert not r["passed"]
        return [c["name"] for c in r["checks"] if not c["passed"]]

    # success falling with the budget (Tramer et al.'s first signature), caught on the per-budget figures
    assert failed(_summary([0.77, 0.59, 0.97, 1.0], [0.5, 0.6, 0.7, 0.9])) == ["success never decreases with eps"]
    assert failed(_summary([0.6, 0.8, 0.9, 0.9], [0.5, 0.6, 0.7, 0.9])) == ["reaches >= 95% at eps 0.3"]
    assert failed(_summary([0.6, 0.8, 0.97, 1.0], [0.5, 0.95, 0.97, 1.0])) == [
        "detector-aware attack at least as strong as detector-unaware ones"
    ]
    short_better = {**steps, "success": [0.99, 0.97]}
    assert failed(good, short_better) == ["more steps never lowers success"]
    assert "more steps never lowers success" in failed(good, None)
    no_large = {e: v for e, v in good.items() if e != "0.3"}
    assert failed(no_large) == ["reaches >= 95% at eps 0.3"]
    # one image of 500 is noise, five are not
    assert sanity_checks(
        _summary([0.6, 0.598, 0.97, 1.0], [0.5, 0.6, 0.7, 0.9]), steps, aware=["selective"], unaware=["mimicry"], n=500
    )["passed"]


def test_a_report_whose_checks_fail_says_so_at_the_top():
    bad = _summary([0.77, 0.59, 0.97, 1.0], [0.5, 0.6, 0.7, 0.9])
    for per in bad.values():
        for s in per.values():
            s.update(success_classifier=1.0, min_auroc=0.5)
    rnd = {
        "name": "original",
        "threshold": 0.5,
        "clean_fpr": 0.05,
        "rows": [],
        "summary": bad,
        "sanity": sanity_checks(bad, None, aware=["selective"], unaware=["mimicry"], n=500),
        "transfer": [],
    }
    report = {
        "bundle": {"path": "x", "arch": "vgg8", "model_sha256": "0" * 64},
        "config": AdaptiveConfig().to_dict(),
        "detector": {"classifier": "ensemble", "feature_groups": ["knn"], "target_fpr": 0.05, "surrogate": {}},
        "headline": {"eps": 0.1, "original": 0.97, "original_classifier_alone": 1.0, "under_half": False},
        "images": {"eval": {"n": 500, "set": "test"}},
        "rounds": [rnd],
        "cost": {"seconds_per_image_step": 0.004, "total_upper_bound": 60, "total_seconds": 50},
        "device": "cpu",
        "threads": 1,
    }
    md = render_markdown(report)
    head = md.split("## Headline")[0]
    assert "Sanity checks FAILED (2)" in head
    assert "success never decreases with eps" in head and "more steps never lowers success" in head


def test_bad_parameters_are_named(parts):
    pipe = parts[3]
    with pytest.raises(ValueError, match="restarts=0"):
        SelectivePGD(pipe, eps=0.1, restarts=0)
    with pytest.raises(ValueError, match="modes="):
        SelectivePGD(pipe, eps=0.1, modes=("sideways",))
    with pytest.raises(ValueError, match="check_steps=100"):
        AdaptiveConfig(steps=100, check_steps=100)
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
    x, y = correct_images(bundle.model, 40, seed=37)
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
            "--quick",
            "--eps",
            "0.3,0.1,0.15",
            "--lambdas",
            "0.3",
            "--harden",
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
    assert r["config"]["eps"] == [0.1, 0.15, 0.3] and r["config"]["n"] == 40 and r["config"]["steps"] == 20
    expected = {
        (a, e, lam) for a, lam in (("pgd", None), ("selective", None), ("mimicry", 0.3)) for e in (0.1, 0.15, 0.3)
    }
    for rd in r["rounds"]:
        assert {(row["attack"], row["eps"], row["lambda"]) for row in rd["rows"]} == expected
        for row in rd["rows"]:
            assert 0 <= row["success_pipeline"] <= row["success_classifier"] <= 1
            assert row["max_linf"] <= row["eps"] + 1e-6
            assert row["auroc"] is None or 0 <= row["auroc"] <= 1
        for per in rd["summary"].values():
            assert set(per) == {"pgd", "selective", "mimicry", "any"}
            assert per["any"]["success_pipeline"] >= max(p["success_pipeline"] for p in per.values())
            assert all(p["success_upto"] >= p["success_pipeline"] for p in per.values())
        assert [c["name"] for c in rd["sanity"]["checks"]] == [
            "success never decreases with eps",
            "reaches >= 95% at eps 0.3",
            "detector-aware attack at least as strong as detector-unaware ones",
            "more steps never lowers success",
        ]
        assert rd["steps_check"]["steps"] == [5, 20]
    # a working attack against an exactly differentiable detector passes every check
    assert r["rounds"][0]["sanity"]["passed"], r["rounds"][0]["sanity"]
    assert r["sanity_passed"] == all(rd["sanity"]["passed"] for rd in r["rounds"])
    assert len(r["rounds"][1]["transfer"]) == 3 * 2
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
    assert r["headline"]["hardened"] == r["rounds"][1]["summary"]["0.1"]["any"]["success_upto"]
    assert r["cost"]["total_upper_bound"] > 0 and r["cost"]["total_seconds"] > 0
    md = (out / "report.md").read_text()
    assert md.split("\n")[2].startswith("**Sanity checks")
    for text in (
        "## Headline",
        "original detector",
        "hardened detector",
        "## Hardening",
        "path mimicry",
        "selective / orthogonal PGD",
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


def _attack_with_detector(tiny_bundle, tmp_path, classifier: str, attacks: str, steps: int, *extra: str) -> Path:
    """Copy the tiny bundle, fit a ``classifier`` detector on ``attacks``, run ``pathguard adaptive`` on 20
    images at eps 0.15 against it with ``extra`` flags; returns the report folder."""
    import shutil

    from detector.fitting import FitConfig, fit_bundle_detector
    from pathguard.main import main

    copy = tmp_path / classifier
    shutil.copytree(tiny_bundle, copy)
    fit_bundle_detector(
        FitConfig(str(copy), attacks, n_fit=60, n_calibration=60, classifier=classifier, prototype_images=400),
        progress=False,
    )
    out = tmp_path / "out"
    argv = ["adaptive", "--bundle", str(copy), "--n", "20", "--eps", "0.15", "--lambdas", "0.3"]
    argv += ["--steps", str(steps), "--attacks", "selective", *extra, "--out", str(out), "--quiet", "--no-plots"]
    assert main([*argv, "--threads", str(torch.get_num_threads())]) == 0
    return out


def test_cli_attacks_a_forest_detector_through_its_surrogate(tiny_bundle, tmp_path):
    """A tree-ensemble detector has no gradient: with ``--surrogate iterates`` the attack follows a network
    refitted on its own iterates; the report says how well it tracks the real scores, and adds the transfer
    attack made against a logistic-regression twin."""
    out = _attack_with_detector(
        tiny_bundle, tmp_path, "rf", "fgsm:eps=0.15,pgd:eps=0.15;steps=5", 3, "--surrogate", "iterates"
    )
    r = json.loads((out / "report.json").read_text())
    sur = r["detector"]["surrogate"]
    assert not sur["exact"] and sur["fitted"] == "on the attack's iterates"
    assert sur["spearman_eval_rows"] > 0.3 and 0 <= sur["same_decision_eval_rows"] <= 1
    assert r["detector"]["classifier"] == "rf" and len(r["rounds"]) == 1
    assert {row["attack"] for row in r["rounds"][0]["rows"]} == {"pgd", "selective", "transfer-logreg"}
    assert "transfer from logistic regression" in (out / "report.md").read_text()


def test_cli_attacks_the_ensemble_detector_and_hardens_it(tiny_bundle, tmp_path):
    """The default kind of detector (clean-only scores combined with weights >= 0): attacked through its p-value
    relaxation (or the iterate-fitted fallback, if a component without one was chosen); hardening re-chooses
    its weights with the adaptive examples as one more family."""
    out = _attack_with_detector(
        tiny_bundle,
        tmp_path,
        "ensemble",
        "fgsm:eps=0.15,pgd:eps=0.15;steps=5,deepfool:steps=5",
        12,  # the cosine step size needs a few steps to cross the tiny task's class boundaries
        *("--n-harden", "20", "--harden", "--no-transfer", "--save-hardened", str(tmp_path / "hardened")),
    )
    copy = tmp_path / "ensemble"
    r = json.loads((out / "report.json").read_text())
    sur = r["detector"]["surrogate"]
    weights = load_bundle(copy).part("detector")[1]["weights"]
    # the layer-consistency votes have no relaxation; the supervised gradient boosting joins as sigmoid splits
    relaxed = weights.get("layer", 0) == 0
    assert sur["kind"] == ("SoftPValues" if relaxed else "IterateSurrogate"), (sur, weights)
    if relaxed and any(weights.get(c, 0) > 0 for c in SUPERVISED):
        assert "supervised trees, sigmoid splits" in sur["components"] and not sur["exact"]
    assert len(r["rounds"]) == 2
    hardened = load_bundle(tmp_path / "hardened").part("detector")[1]
    assert hardened["estimator"] == "PathEnsembleDetector"
    assert "adaptive" in hardened["selection"]["families"]
    assert min(hardened["selection"]["chosen"]["weights"]) >= 0
