"""bench.evaluation_rerun: how far a rerun's figures land from a committed report, and its timing."""

import json

from bench import evaluation_rerun


def _report(auroc: dict, seconds: float) -> dict:
    results = {det: {a: {"auroc": v, "tpr_at_fpr": v / 2} for a, v in per.items()} for det, per in auroc.items()}
    return {"results": results, "timing": {"total_seconds": seconds, "attack_seconds": {}, "stages": {}}}


def test_largest_change_per_detector_over_shared_attacks(tmp_path):
    old = _report({"path": {"fgsm": 0.90, "pgd": 0.95}, "gone": {"fgsm": 0.5}}, 100.0)
    new = _report({"path": {"fgsm": 0.91, "pgd": 0.92, "cw": 0.1}, "new": {"fgsm": 0.7}}, 1150.0)
    paths = [tmp_path / "old.json", tmp_path / "new.json", tmp_path / "out.json"]
    for p, r in zip(paths, (old, new), strict=False):
        p.write_text(json.dumps(r))
    evaluation_rerun.main(["--rerun", str(paths[1]), "--committed", str(paths[0]), "--json", str(paths[2])])
    out = json.loads(paths[2].read_text())
    assert set(out["per_detector"]) == {"path"}  # only detectors both reports hold; cw only where both scored
    assert out["per_detector"]["path"]["attacks"] == 2
    assert abs(out["per_detector"]["path"]["max_abs_auroc"] - 0.03) < 1e-12
    assert abs(out["max_abs_tpr_any_detector"] - 0.015) < 1e-12
    assert out["rerun_total_seconds"] == 1150.0
