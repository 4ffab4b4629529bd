"""bench.bundle_lofo: the shipped ensemble recipe refitted without each attack family, scored on that family."""

import json
import shutil

import numpy as np
import pytest

from bench import bundle_lofo, selection_lofo
from detector import load_bundle
from detector.attacks import parse_attacks
from detector.detectors.ensemble import DEFAULT_COMPONENTS, SHIPPED_WEIGHTS
from detector.fitting import FitConfig, fit_bundle_detector

FIT_ATTACKS = "fgsm:eps=0.15,pgdl2:eps=1.5;steps=5,deepfool:steps=5"  # three families


@pytest.fixture(scope="module")
def ensemble_bundle(tiny_bundle, tmp_path_factory):
    copy = tmp_path_factory.mktemp("lofo") / "ensemble"
    shutil.copytree(tiny_bundle, copy)
    fit_bundle_detector(
        FitConfig(
            str(copy),
            FIT_ATTACKS,
            n_fit=60,
            n_calibration=60,
            classifier="ensemble",
            prototype_images=400,
            knn_reference_grid="20,50",
        ),
        progress=False,
    )
    return copy


def test_the_recipe_is_read_from_the_bundles_record(ensemble_bundle):
    cfg = bundle_lofo.recipe(load_bundle(ensemble_bundle), str(ensemble_bundle), None)
    assert parse_attacks(cfg.attacks) == parse_attacks(FIT_ATTACKS)
    assert (cfg.n_fit, cfg.n_calibration, cfg.knn_reference_grid) == (60, 60, "20,50")
    assert cfg.noisy_negatives and cfg.classifier == "ensemble"
    # the shipped weights are fixed: every component at 1
    assert cfg.component_names == list(DEFAULT_COMPONENTS) and cfg.fixed_weights == SHIPPED_WEIGHTS
    assert cfg.ensemble().weights == SHIPPED_WEIGHTS
    # a detector whose weights were chosen is refitted with the selection and the ties it was chosen by
    bundle = load_bundle(ensemble_bundle)
    bundle.parts["detector"][1]["params"]["weights"] = None
    chosen = bundle_lofo.recipe(bundle, str(ensemble_bundle), None)
    assert chosen.fixed_weights is None and chosen.ensemble().weights is None
    assert (chosen.weight_tolerance, chosen.prefer) == (0.002, "more")  # the tie rule of stop 31
    for key in ("weight_tolerance", "prefer"):  # saved before ties had a tolerance: the plain rule
        del bundle.parts["detector"][1]["params"][key]
    old = bundle_lofo.recipe(bundle, str(ensemble_bundle), None)
    assert (old.weight_tolerance, old.prefer) == (0.0, "fewer")


def test_a_bundle_without_an_ensemble_is_refused(tiny_bundle):
    with pytest.raises(SystemExit, match="no ensemble detector"):
        bundle_lofo.recipe(load_bundle(tiny_bundle), str(tiny_bundle), None)


def test_each_family_is_held_out_of_fitting_and_scored_alone(ensemble_bundle, tmp_path):
    out = tmp_path / "lofo.json"
    bundle_lofo.main(
        ["--bundle", str(ensemble_bundle), "--attacks", "fgsm:eps=0.15,deepfool:steps=5", "--n", "40"]
        + ["--threads", "2", "--json", str(out)]
    )
    r = json.loads(out.read_text())
    shipped = load_bundle(ensemble_bundle).parts["detector"][1]["weights"]
    # refitted on every family, the recipe gives back the shipped detector's weights
    assert r["all_families"]["fit"]["weights"] == shipped
    assert set(r["all_families"]["test"]) == {"fgsm:eps=0.15", "deepfool:steps=5"}
    assert set(r["held_out"]) == {"gradient-sign-linf", "optimisation-l2", "minimal-perturbation"}
    for family, held in r["held_out"].items():
        assert family not in held["fit"]["validation_families"]
        assert len(held["fit"]["validation_families"]) == 2
        assert min(held["fit"]["weights"].values()) >= 0
    assert held_labels(r, "gradient-sign-linf") == ["fgsm:eps=0.15"] and held_labels(r, "optimisation-l2") == []
    assert held_labels(r, "minimal-perturbation") == ["deepfool:steps=5"]
    assert r["held_out"]["gradient-sign-linf"]["fitted_without"] == ["fgsm:eps=0.15"]
    worst = r["summary"]["worst_unseen_auroc"]
    assert worst["auroc"] == min(m["auroc"] for h in r["held_out"].values() for m in h["test"].values())


def held_labels(r: dict, family: str) -> list[str]:
    return list(r["held_out"][family]["test"])


def test_recipe_rows_without_a_family_hold_none_of_its_rows(ensemble_bundle):
    r = bundle_lofo.recipe_rows(load_bundle(ensemble_bundle), str(ensemble_bundle), None)
    assert set(r.family.values()) == {"gradient-sign-linf", "optimisation-l2", "minimal-perturbation"}
    val = r.without("optimisation-l2")
    assert set(val.adversarial) == {"gradient-sign-linf", "minimal-perturbation"}
    kept = [a for a, f in r.family.items() if f != "optimisation-l2"]
    assert sum(len(v) for v in val.adversarial.values()) == int(np.isin(r.rows.source, kept).sum())
    assert "optimisation-l2" not in val.noisy


def test_nested_selection_scores_each_family_with_a_procedure_fitted_without_it(ensemble_bundle, tmp_path):
    out = tmp_path / "selection.json"
    selection_lofo.main(["--bundle", str(ensemble_bundle), "--procedures", "0,2,7", "--json", str(out)])
    procedures = json.loads(out.read_text())["procedures"]
    names = list(selection_lofo.PROCEDURES)
    assert list(procedures) == [names[0], names[2], names[7]]
    fixed = procedures[names[7]]["per_attack"]
    assert set(fixed) == {"fgsm:eps=0.15", "pgdl2:eps=1.5,steps=5", "deepfool:steps=5"}
    assert all(v["weights"] == {"joint": 1.0, "margin": 1.0, "gb": 1.0} for v in fixed.values())
    shipped = procedures[names[0]]["per_attack"]
    assert all(v["weights"] == dict(zip(DEFAULT_COMPONENTS, SHIPPED_WEIGHTS)) for v in shipped.values())
    # the recipe's weights are fixed; a selection procedure chooses its own from the grid
    selected = procedures[names[2]]["per_attack"].values()
    assert all(set(v["weights"].values()) <= {0.5, 1.0} and "input" not in v["weights"] for v in selected)
    for p in procedures.values():
        assert p["worst_auroc"] == min(v["auroc"] for v in p["per_attack"].values())
        assert all(min(v["weights"].values()) >= 0 for v in p["per_attack"].values())
        assert p["under_target_tpr"] == sorted(a for a, v in p["per_attack"].items() if v["tpr_at_fpr"] < 0.85)
        assert p["lowest_tpr_reported_attacks"] is None  # none of these budgets is in the evaluation's matrix


def test_fit_detector_weights_are_shipped_equal_select_or_one_per_component():
    assert FitConfig().fixed_weights == FitConfig(weights="shipped").fixed_weights == SHIPPED_WEIGHTS
    assert SHIPPED_WEIGHTS == (1.0, 1.0, 0.5, 1.0, 1.0, 1.0)  # joint, knn, summary 0.5, margin, input, gb
    assert FitConfig(weights="equal").fixed_weights == (1.0,) * 6
    assert FitConfig(components="joint,summary,gb").fixed_weights == (1.0, 0.5, 1.0)  # shipped, by component
    assert FitConfig(weights="select").fixed_weights is None and FitConfig(weights="select").ensemble().weights is None
    cfg = FitConfig(components="joint,gb", weights="1,0.5")
    assert cfg.fixed_weights == (1.0, 0.5) and cfg.ensemble().weights == (1.0, 0.5)
    for bad in ("1,1", "1,1,1,1,-1", "0,0,0,0,0", "heavy"):
        with pytest.raises(ValueError, match="weights="):
            FitConfig(weights=bad)
