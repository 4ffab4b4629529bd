"""`pathguard train` (FLOPs target, stop and resume), `pathguard decouple` and `pathguard training-report`."""

import json
import shutil
from pathlib import Path

import pytest

from detector.training import TrainConfig, train
from pathguard.main import main

TINY = ["--epochs", "2", "--train-subset", "128", "--val-size", "100", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    from synthetic import write_dataset

    root = tmp_path_factory.mktemp("cli")
    data = write_dataset(root / "data", n_train=500, n_test=100)
    train(
        TrainConfig(
            dataset="npz",
            data_root=str(data),
            gated=False,
            epochs=1,
            batch_size=64,
            val_size=100,
            augment=(),
            threads=1,
        ),
        root / "dense",
        progress=False,
    )
    return root / "dense"


def test_decouple_takes_data_from_the_dense_bundle_stops_and_resumes(dense, tmp_path, capsys):
    out = tmp_path / "dec"
    assert main(["decouple", "--from", str(dense), "--out", str(out), *TINY, "--stop-after", "1"]) == 0
    assert json.loads(capsys.readouterr().out) == {"stopped_after_epoch": 1}
    assert (out / "checkpoint" / "checkpoint.json").is_file() and not (out / "bundle.json").exists()
    assert main(["decouple", "--from", str(dense), "--out", str(out), "--resume", "--quiet"]) == 0
    meta = json.loads((out / "bundle.json").read_text())
    dense_cfg = json.loads((dense / "bundle.json").read_text())["train_config"]
    cfg = meta["train_config"]
    assert meta["gated"] and cfg["init_from"] == str(dense)
    assert "; resumed after epoch 1: " in meta["command"]  # how the run started, and how it continued
    assert cfg["dataset"] == "npz" and cfg["data_root"] == dense_cfg["data_root"] and cfg["seed"] == dense_cfg["seed"]
    assert cfg["distill"] == 0.5 and cfg["target_flops"] == 0.25 and cfg["align_mode"] == "onesided"
    assert cfg["gate"]["init_bias"] == 0.5 and cfg["epochs"] == 2  # the flags given at the start, kept on resume
    assert cfg["gate"]["reduction"] == 1  # decoupling defaults to full-width controlling modules
    assert meta["gate"]["reduction"] == 1
    assert [json.loads(x)["epoch"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]


def test_train_flags_and_refused_checkpoint(dense, tmp_path, capsys):
    data_root = json.loads((dense / "bundle.json").read_text())["train_config"]["data_root"]
    out = tmp_path / "g"
    args = [
        "train",
        "--out",
        str(out),
        "--dataset",
        "npz",
        "--data-root",
        data_root,
        *TINY,
        "--target-flops",
        "0.5",
        "--align-mode",
        "onesided",
        "--aux-warmup",
        "0.3",
        "--w-sparsity",
        "0",
    ]
    assert main([*args, "--stop-after", "1"]) == 0
    tensors = next((out / "checkpoint").glob("*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-16])
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "does not match its SHA-256" in err and "corrupt" in err
    assert main([*args]) == 2  # a fresh start would throw the unfinished run away: refused
    assert "unfinished run" in capsys.readouterr().err
    shutil.rmtree(out / "checkpoint")
    assert main([*args]) == 0
    cfg = json.loads((out / "bundle.json").read_text())["train_config"]
    assert cfg["target_flops"] == 0.5 and cfg["align_mode"] == "onesided" and cfg["aux_warmup"] == 0.3
    assert not (out / "checkpoint").exists()


def test_training_report_command(dense, tmp_path, capsys):
    gated = tmp_path / "g"
    assert main(["decouple", "--from", str(dense), "--out", str(gated), *TINY]) == 0
    capsys.readouterr()
    out = tmp_path / "rep"
    assert main(["training-report", "--bundles", str(gated), "--dense", str(dense), "--out", str(out)]) == 0
    assert "| g |" in capsys.readouterr().out
    rep = json.loads((out / "tradeoff.json").read_text())
    assert rep["points"][0]["name"] == "g" and [d["name"] for d in rep["dense"]] == ["dense"]
    assert main(["training-report", "--bundles", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_decouple_help_names_the_defaults_decouple_applies(capsys):
    with pytest.raises(SystemExit):
        main(["decouple", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert "PATHGUARD_GATE_REDUCTION; default: 1)" in text and "PATHGUARD_LR; default: 0.002)" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "PATHGUARD_GATE_REDUCTION; default: 4)" in text and "PATHGUARD_LR; default: 0.004)" in text
