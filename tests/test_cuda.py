"""The ``--device cuda`` paths: training and adaptive attacks on a GPU. Skipped where torch sees no CUDA
device (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic import correct_images

from detector import load_bundle
from detector.adaptive import Pipeline, SelectivePGD, build_surrogate
from detector.adaptive.hardening import as_device
from detector.adaptive.surrogate import surrogate_agreement
from detector.detectors import PathEnsembleDetector
from detector.features import extract_path_features
from detector.training import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EPS = 0.15  # as in test_adaptive: the tiny synthetic task needs about this much to flip a class


def test_training_on_cuda_repeats_itself_and_its_bundle_loads_on_the_cpu(tiny_bundle, tmp_path):
    common = dict(
        dataset="npz",
        data_root=str(tiny_bundle.parent / "data"),
        epochs=1,
        batch_size=64,
        val_size=200,
        train_subset=128,
        device="cuda",
        augment=("hflip", "shift"),
        seed=5,
    )
    a = train(TrainConfig(**common), tmp_path / "a", progress=False)
    b = train(TrainConfig(**common), tmp_path / "b", progress=False)
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    a.pop("epoch_seconds"), b.pop("epoch_seconds")
    assert a == b
    bundle = load_bundle(tmp_path / "a")  # on the CPU, by default
    assert {p.device.type for p in bundle.model.parameters()} == {"cpu"}
    assert json.loads((tmp_path / "a" / "bundle.json").read_text())["train_config"]["device"] == "cuda"


@pytest.mark.parametrize("kind", ["auto", "iterates"])
def test_selective_pgd_on_cuda_matches_the_cpu(tiny_bundle, kind):
    """Every surrogate kind lives on the model's device, and the attack finds what it finds on the CPU."""
    success = {}
    x, y = correct_images(load_bundle(tiny_bundle).model, 40, seed=41)
    for device in ("cpu", "cuda"):
        bundle = load_bundle(tiny_bundle, device=torch.device(device))
        protos, det = as_device(bundle.prototypes(), torch.device(device)), bundle.detector()
        X_clean = extract_path_features(bundle.model, protos, x).X
        sur = build_surrogate(det, X_clean, kind=kind, seed=0, device=device)
        assert {b.device.type for b in sur.buffers()} == {torch.device(device).type}
        assert surrogate_agreement(sur, det, X_clean) > 0.5
        res = SelectivePGD(Pipeline(bundle.model, protos, det, sur), eps=EPS, steps=10)(x, y, seed=0)
        assert res.adversarial.device.type == "cpu" and (res.adversarial - x).abs().max() <= EPS + 1e-6
        pred, scores, _ = Pipeline(bundle.model, protos, det, sur).evaluate(res.adversarial)
        success[device] = float(np.mean((pred != y.numpy()) & (scores <= det.threshold_)))
    assert success["cuda"] > 0.3, success
    assert abs(success["cuda"] - success["cpu"]) <= 0.15, success


def test_the_adaptive_cli_runs_on_cuda(tiny_bundle, tmp_path):
    from pathguard.main import main

    out = tmp_path / "adaptive"
    args = ["adaptive", "--bundle", str(tiny_bundle), "--quick", "--eps", "0.15,0.3", "--lambdas", "0.3"]
    assert main([*args, "--device", "cuda", "--out", str(out), "--quiet", "--no-plots"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["device"].startswith("cuda")
    assert r["rounds"][0]["sanity"]["passed"], r["rounds"][0]["sanity"]


def test_an_ensemble_detectors_relaxation_moves_to_cuda(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    protos = bundle.prototypes()
    x, _ = correct_images(bundle.model, 60, seed=43)
    feats = extract_path_features(bundle.model, protos, x)
    X = feats.X
    det = PathEnsembleDetector(components=("joint", "knn", "margin"), weights=(1, 1, 0.5)).fit(
        X, groups=feats.groups, layer_sizes=protos.layer_sizes
    )
    for kind in ("auto", "iterates"):
        sur = build_surrogate(det, X, kind=kind, device="cuda")
        z = sur.logit(torch.as_tensor(X, dtype=torch.float64, device="cuda"))
        assert z.device.type == "cuda" and torch.isfinite(z).all()
