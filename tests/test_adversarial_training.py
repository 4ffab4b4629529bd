"""Adversarial fine-tuning (``--adversarial-eps``): the attack it trains on, and that it buys robustness."""

from __future__ import annotations

import json

import pytest
import torch
from synthetic import tiny_config, write_dataset

from detector import load_bundle
from detector.data import load_dataset
from detector.training import TrainConfig, train
from detector.training.adversarial import attack_batch, mix_adversarial, robust_accuracy

EPS = 0.12


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same gated run twice (same seed and data): plain, and with FGSM examples mixed in."""
    root = tmp_path_factory.mktemp("adv")
    data = write_dataset(root / "data")
    plain = train(tiny_config(data), root / "plain", progress=False)
    robust = train(tiny_config(data, adversarial_eps=EPS), root / "robust", progress=False)
    return data, root, plain, robust


def test_attack_stays_in_the_ball_and_restores_the_model(tiny_bundle):
    model = load_bundle(tiny_bundle).model.train()
    test = load_dataset("npz", "test", str(tiny_bundle.parent / "data"))
    x, y = test.float_images(slice(0, 32)), test.labels[:32]
    gen = torch.Generator().manual_seed(0)
    for steps in (1, 5):
        adv = attack_batch(model, x, y, eps=0.1, steps=steps, gen=gen)
        assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert model.training and all(p.grad is None for p in model.parameters())
    # PGD hurts the classifier more than no attack at all
    assert robust_accuracy(model, x, y, eps=0.3, steps=5) < (model.eval()(x).argmax(1) == y).float().mean()
    cfg = TrainConfig(dataset="npz", adversarial_eps=0.1, adversarial_fraction=0.5)
    mixed = mix_adversarial(model, x, y, cfg, gen)
    changed = (mixed != x).flatten(1).any(1)
    assert int(changed.sum()) == 16  # half the rows attacked, the other half clean
    assert torch.equal(mixed[~changed], x[~changed])
    assert mix_adversarial(model, x, y, TrainConfig(dataset="npz"), gen) is x


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="adversarial_eps=1.5"):
        TrainConfig(adversarial_eps=1.5)
    with pytest.raises(ValueError, match="adversarial_steps=0"):
        TrainConfig(adversarial_steps=0)
    with pytest.raises(ValueError, match="adversarial_fraction=0"):
        TrainConfig(adversarial_fraction=0)


def test_adversarial_training_raises_robust_accuracy(runs):
    data, root, plain, robust = runs
    assert "robust" not in plain and robust["robust"]["n"] == 300
    test = load_dataset("npz", "test", str(data))
    x, y = test.float_images(), test.labels
    acc = {
        name: robust_accuracy(load_bundle(root / name).model, x, y, eps=EPS, steps=10) for name in ("plain", "robust")
    }
    assert acc["robust"] >= acc["plain"] + 0.1, acc
    assert robust["robust"]["accuracy"][f"{EPS:g}"] == pytest.approx(acc["robust"], abs=0.05)
    assert robust["accuracy"] >= 0.8  # clean accuracy kept
    cfg = load_bundle(root / "robust").meta["train_config"]
    assert (cfg["adversarial_eps"], cfg["adversarial_steps"]) == (EPS, 1)


def test_cli_flags_reach_train_and_decouple(runs, tmp_path):
    from pathguard.main import build_parser, main
    from pathguard.options import config_from

    args = build_parser().parse_args(
        ["train", "--out", str(tmp_path), "--adversarial-eps", "0.05", "--adversarial-steps", "3"]
    )
    cfg = config_from(TrainConfig, args, {})
    assert (cfg.adversarial_eps, cfg.adversarial_steps, cfg.adversarial_fraction) == (0.05, 3, 0.5)
    data, root, *_ = runs
    train(tiny_config(data, gated=False, epochs=1), root / "dense", progress=False)
    out = tmp_path / "decoupled"
    argv = ["decouple", "--from", str(root / "dense"), "--out", str(out), "--epochs", "1", "--threads", "1"]
    assert main([*argv, "--adversarial-eps", "0.1", "--adversarial-steps", "2", "--quiet"]) == 0
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["gated"] and (meta["train_config"]["adversarial_eps"], meta["train_config"]["adversarial_steps"]) == (
        0.1,
        2,
    )
    assert set(meta["metrics"]["test"]["robust"]["accuracy"]) == {"0.05", "0.1"}
