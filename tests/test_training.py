"""Training: config validation, a reproducible run, the log and the CLI."""

import json

import pytest
import torch

from detector.training import TrainConfig, train
from pathguard.main import main


def test_config_validates():
    with pytest.raises(ValueError, match="optimizer='adam'"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="augment='rotate'"):
        TrainConfig(augment=("rotate",))
    cfg = TrainConfig(w_sparsity=0.2)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_reproducible_by_seed_and_logged(tiny_bundle, tmp_path):
    data = tiny_bundle.parent / "data"
    common = dict(
        dataset="npz",
        data_root=str(data),
        epochs=1,
        batch_size=64,
        val_size=200,
        train_subset=128,
        threads=1,
        augment=("hflip", "shift"),
    )
    a = train(TrainConfig(seed=5, **common), tmp_path / "a", progress=False)
    b = train(TrainConfig(seed=5, **common), tmp_path / "b", progress=False)
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    a.pop("epoch_seconds"), b.pop("epoch_seconds")
    assert a == b
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"ce", "mi", "infomax", "sparsity", "align"} <= set(log[0]["train"])
    assert "accuracy" in log[0]["val"]


def test_cli_train_and_info(tiny_bundle, tmp_path, capsys):
    data = tiny_bundle.parent / "data"
    rc = main(
        [
            "train",
            "--out",
            str(tmp_path / "d"),
            "--dataset",
            "npz",
            "--data-root",
            str(data),
            "--epochs",
            "1",
            "--gated",
            "false",
            "--train-subset",
            "64",
            "--val-size",
            "100",
            "--threads",
            "1",
            "--quiet",
        ]
    )
    assert rc == 0
    meta = json.loads((tmp_path / "d" / "bundle.json").read_text())
    assert meta["gated"] is False and meta["train_config"]["gated"] is False
    assert meta["command"].startswith("pathguard")
    capsys.readouterr()
    assert main(["info", str(tiny_bundle)]) == 0
    text = capsys.readouterr().out
    assert "vgg8 gated" in text and "detector" in text and "threshold" in text
    assert main(["info", str(tmp_path / "nowhere")]) == 2
