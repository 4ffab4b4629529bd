"""The offline evaluation suite end to end on the tiny bundle, single run and sharded."""

import functools
import json
import shutil

import pytest

from detector import fitting
from detector.bundle import load_bundle
from detector.detectors.ensemble import DEFAULT_COMPONENTS, FIXED_RULE, SHIPPED_WEIGHTS
from detector.prototypes import compute_prototypes
from pathguard.main import main

ATTACKS = "fgsm:eps=0.15,pgd:eps=0.2;steps=5,deepfool:steps=5"
# the cheaper detectors; every baseline is exercised by tests/test_baselines.py
COMMON = [
    "--attacks",
    ATTACKS,
    "--detectors",
    "path,path-rf,confidence,bundle,lid,clean-knn,path-ensemble",
    "--n",
    "40",
    "--n-fit",
    "30",
    "--n-calibration",
    "30",
    "--n-reference",
    "200",
    "--batch-size",
    "16",
    "--quiet",
]


@pytest.fixture(scope="module")
def single_run(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "single"
    assert main(["evaluate", "--bundle", str(tiny_bundle), "--out", str(out), *COMMON]) == 0
    return out


def test_report_complete(single_run):
    r = json.loads((single_run / "report.json").read_text())
    attacks = list(r["attacks"])
    assert attacks == ["fgsm:eps=0.15", "pgd:eps=0.2,steps=5", "deepfool:steps=5"]
    for a in attacks:
        s = r["attacks"][a]
        assert 0 <= s["success_rate"] <= 1 and s["mean_l2"] > 0
    assert r["attacks"]["fgsm:eps=0.15"]["max_linf"] <= 0.15 + 1e-5
    for det in ("path", "path-rf", "confidence", "bundle"):
        for a in attacks:
            m = r["results"][det][a]
            assert {"auroc", "tpr_at_fpr", "fpr_at_threshold", "detection_accuracy", "all"} <= set(m)
        assert r["timing"]["detectors"][det]["score_cost_ratio"] > 0
    assert r["results"]["path"]["fgsm:eps=0.15"]["auroc"] > 0.8
    assert set(r["leave_one_attack_out"]["path"]) == set(attacks)
    assert {"only:soft", "without:proto"} <= set(r["ablation"])
    # the image sets are disjoint and documented
    fit, cal, ev = (r["images"][k] for k in ("fit", "calibration", "eval"))
    assert fit["set"] == cal["set"] != ev["set"]
    assert not set(fit["indices"]) & set(cal["indices"])
    assert len(ev["indices"]) == 40
    for f in r["plots"]:
        assert (single_run / f).stat().st_size > 1000
    md = (single_run / "report.md").read_text()
    assert "Leave one attack out" in md and "| path |" in md
    assert "Leave one family out" in md and "Unseen attacks first" in md and "heatmap.png" in r["plots"]


def test_every_row_states_its_fitting_set_and_what_it_saw(single_run):
    r = json.loads((single_run / "report.json").read_text())
    md = (single_run / "report.md").read_text()
    for det, info in r["detectors"].items():
        text = info["fitting"]["text"]
        assert text and f"| {det} | {text} |" in md
    assert "no adversarial example" in r["detectors"]["clean-knn"]["fitting"]["text"]
    assert "not on this evaluation's fitting images" in r["detectors"]["bundle"]["fitting"]["text"]
    # a clean-only detector never saw any attack; a supervised one saw every attack it fitted on
    assert not any(m["seen"] for m in r["results"]["clean-knn"].values())
    fitted = set(r["detectors"]["path"]["fitting"]["adversarial"])
    assert all(m["seen"] == (a in fitted) for a, m in r["results"]["path"].items())
    # leave one family out: the fit for a family names the attacks it saw, none of them in the family
    families = {a: s["family"] for a, s in r["attacks"].items()}
    for det in ("path", "path-rf", "path-ensemble"):
        for family, per in r["leave_one_family_out"][det].items():
            assert set(per) == {a for a, f in families.items() if f == family}
            for m in per.values():
                if m.get("fitted_on") is not None:
                    assert not {families[a] for a in m["fitted_on"]} & {family}
    # the shipped recipe, refitted here: its supervised part saw noisy clean negatives; its weights are fixed
    ens = r["detectors"]["path-ensemble"]
    assert ens["fitting"]["kind"] == "clean-only + supervised on validation"
    assert ens["fitting"]["n_noisy"] > 0 and "noisy clean" in ens["fitting"]["text"]
    assert ens["fitting"]["text"].startswith("supervised part fitted on ")
    assert ens["selection"]["rule"] == FIXED_RULE and ens["weights"] == dict(zip(DEFAULT_COMPONENTS, SHIPPED_WEIGHTS))
    assert ens["selection"]["families"] == sorted({families[a] for a in ens["fitting"]["adversarial"]})
    assert "no adversarial example" not in r["detectors"]["path"]["fitting"]["text"]
    assert r["detectors"]["path"]["fitting"]["n_noisy"] == 0  # noisy rows only for the entries that ask for them
    assert "clean-knn" not in r["leave_one_family_out"]  # clean-only: every attack is unseen already
    assert r["unseen_summary"]["clean-knn"]["source"].startswith("main table")


def test_sharded_run_merges_to_the_single_report(tiny_bundle, single_run, tmp_path):
    out = tmp_path / "sharded"
    for i in range(3):
        assert main(["evaluate", "--bundle", str(tiny_bundle), "--out", str(out), "--shard", f"{i}/3", *COMMON]) == 0
    assert len(list((out / "shards").glob("*.npz"))) == 3
    assert main(["evaluate", "merge", "--out", str(out), "--quiet"]) == 0
    a = json.loads((single_run / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    a.pop("timing"), b.pop("timing")
    assert a == b


def test_merge_refuses_incomplete_shards(tiny_bundle, tmp_path):
    out = tmp_path / "partial"
    assert main(["evaluate", "--bundle", str(tiny_bundle), "--out", str(out), "--shard", "0/2", *COMMON]) == 0
    assert main(["evaluate", "merge", "--out", str(out), "--quiet"]) == 2


def test_a_bundle_fitted_before_the_input_group_gets_every_detector(tiny_bundle, tmp_path, monkeypatch):
    """Prototypes without ``input_size`` (bundles fitted before the input-consistency score, e.g. models/robust):
    the run still fits the detectors that read the image, and scores the shipped detector on its own columns."""
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    monkeypatch.setattr(fitting, "compute_prototypes", functools.partial(compute_prototypes, with_input=False))
    fitting.fit_bundle_detector(
        fitting.FitConfig(str(old), "fgsm:eps=0.15", classifier="logreg", n_fit=60, n_calibration=60),
        progress=False,
    )
    assert load_bundle(old).prototypes().input_size == 0
    args = [*COMMON[:1], "fgsm:eps=0.15", "--detectors", "bundle,clean-input,path", *COMMON[4:]]
    out = tmp_path / "eval"
    assert main(["evaluate", "--bundle", str(old), "--out", str(out), *args, "--ablation", "false"]) == 0
    r = json.loads((out / "report.json").read_text())
    for det in ("bundle", "clean-input", "path"):
        assert 0 <= r["results"][det]["fgsm:eps=0.15"]["auroc"] <= 1, det
    assert r["results"]["bundle"]["fgsm:eps=0.15"]["auroc"] > 0.5  # its own columns, not shifted ones
