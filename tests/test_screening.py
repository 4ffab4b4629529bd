"""load_bundle(path).screen(images): predictions, scores, flags and paths, and precise input errors."""

import numpy as np
import pytest
import torch
from synthetic import make_images

from detector import load_bundle
from detector.attacks import AttackSpec, run_attack
from detector.screening import InvalidImages


def test_screen_fields_and_consistency(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    x, _ = make_images(20, seed=4)
    x = torch.from_numpy(x)
    r = bundle.screen(x)
    assert len(r) == 20
    np.testing.assert_array_equal(r.predictions, bundle.model(x).argmax(1).numpy())
    np.testing.assert_allclose(r.probabilities.sum(1), 1, rtol=1e-5)
    assert ((r.scores >= 0) & (r.scores <= 1)).all()
    np.testing.assert_array_equal(r.flags, r.scores > r.threshold)
    assert r.paths.shape == (20, sum(bundle.model.gate_sizes)) and r.paths.dtype == np.uint8
    assert r.departure.shape == (20, len(bundle.model.gate_sizes))
    assert ((r.flops_ratio > 0) & (r.flops_ratio <= 1.01)).all()
    np.testing.assert_allclose(r.active_ratio, r.paths.mean(1), rtol=1e-6)
    # the batch split inside screen does not change results
    small = bundle.screener(batch_size=7).screen(x)
    np.testing.assert_allclose(small.scores, r.scores, rtol=0, atol=1e-5)  # float32 batch-size rounding


def test_adversarial_images_score_higher(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    x, y = make_images(60, seed=5)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    adv = run_attack(bundle.model, x, y, AttackSpec("fgsm", {"eps": 0.15}), progress=False).adversarial
    clean, attacked = bundle.screen(x), bundle.screen(adv)
    assert attacked.scores.mean() > clean.scores.mean() + 0.2
    assert attacked.flags.mean() > clean.flags.mean()


@pytest.mark.parametrize(
    "images,match",
    [
        (torch.rand(2, 1, 16), "4 dimensions"),
        (torch.rand(2, 3, 16, 16), r"\(C, H, W\) = \(1, 16, 16\)"),
        (torch.zeros(0, 1, 16, 16), "no images"),
        (torch.full((1, 1, 16, 16), float("nan")), "NaN"),
        (torch.full((1, 1, 16, 16), 2.0), r"\[0, 1\]"),
        (torch.zeros(1, 1, 16, 16, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_images_rejected(tiny_bundle, images, match):
    with pytest.raises(InvalidImages, match=match):
        load_bundle(tiny_bundle).screen(images)


def test_bundle_without_detector_explains(tiny_bundle, tmp_path):
    import shutil

    from detector.bundle import write_part

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    write_part(copy, "detector", tensors=None, info=None)
    with pytest.raises(ValueError, match="fit-detector"):
        load_bundle(copy).screen(torch.rand(1, 1, 16, 16))


def test_screening_with_the_ensemble_detector(tiny_bundle, tmp_path):
    """A bundle shipping the ensemble screens like any other: scores are the detector's on the path features."""
    import shutil

    from detector.features import extract_path_features
    from detector.fitting import FitConfig, fit_bundle_detector

    copy = tmp_path / "ensemble"
    shutil.copytree(tiny_bundle, copy)
    info = fit_bundle_detector(
        FitConfig(
            str(copy),
            "fgsm:eps=0.15,deepfool:steps=5",
            n_fit=60,
            n_calibration=60,
            classifier="ensemble",
            prototype_images=400,
        ),
        progress=False,
    )
    assert info["estimator"] == "PathEnsembleDetector" and min(info["weights"].values()) >= 0
    bundle = load_bundle(copy)
    screener = bundle.screener()
    x, y = make_images(40, seed=6)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    r = screener.screen(x)
    X = extract_path_features(bundle.model, screener.prototypes, x).X
    np.testing.assert_allclose(r.scores, screener.detector.decision_function(X), rtol=1e-5, atol=1e-6)
    adv = run_attack(bundle.model, x, y, AttackSpec("fgsm", {"eps": 0.15}), progress=False).adversarial
    assert screener.screen(adv).scores.mean() > r.scores.mean()
