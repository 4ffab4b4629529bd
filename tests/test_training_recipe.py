"""The training recipe of issue 13: FLOPs target, decoupling a dense bundle, checkpoints and resume."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from detector.bundle import load_bundle
from detector.data import load_dataset
from detector.models import GateConfig
from detector.training import TrainConfig, train
from detector.training.checkpoint import CheckpointError, checkpoint_dir
from detector.training.decouple import continue_dense, decouple_from
from detector.training.losses import feature_hint_loss
from detector.training.metrics import model_metrics
from detector.training.trainer import objective


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("recipe") / "data", n_train=700, n_test=200)


def _cfg(data: Path, **kw) -> TrainConfig:
    base = dict(
        dataset="npz",
        data_root=str(data),
        batch_size=64,
        lr=3e-3,
        val_size=100,
        augment=(),
        threads=1,
        gate=GateConfig(init_bias=0.5),
    )
    return TrainConfig(**{**base, **kw})


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dense(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense") / "bundle"
    train(_cfg(data, gated=False, epochs=2), out, progress=False)
    return out


def test_flops_target_is_reached_and_spares_the_cheap_first_layer(data, tmp_path):
    free = train(_cfg(data, epochs=2, train_subset=256, w_sparsity=0.0, w_align=0.0), tmp_path / "free", progress=False)
    target = 0.4
    got = train(
        _cfg(data, epochs=5, w_sparsity=0.0, target_flops=target, align_mode="onesided", aux_warmup=0.2),
        tmp_path / "target",
        progress=False,
    )
    assert free["flops_ratio"] > 0.8  # without the target nothing switches the gates off here
    assert abs(got["flops_ratio"] - target) < 0.08, got["flops_ratio"]
    assert got["accuracy"] > 0.8
    layers = got["layer_density"]
    # the first conv holds ~1% of the FLOPs: the target takes its cuts from the expensive layers
    assert layers["features.0"] > max(layers[k] for k in layers if k != "features.0") - 0.05
    assert "flops_target" in _log(tmp_path / "target")[-1]["train"]


def test_decouple_starts_at_dense_accuracy_and_distillation_recovers(data, dense, tmp_path):
    cfg = _cfg(data, epochs=4, init_from=str(dense), distill=0.5, target_flops=0.4, align_mode="onesided")
    model, _, teacher, _ = decouple_from(cfg)
    test = load_dataset("npz", "test", str(data))
    x = test.float_images(slice(0, 100))
    model.eval()
    assert torch.allclose(model(x), teacher(x), atol=1e-5)  # gates all on: the dense network, exactly
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())  # frozen teacher
    convs = [p for p in teacher.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)  # its faster layout
    start, dense_m = model_metrics(model, test), json.loads((dense / "bundle.json").read_text())["metrics"]["test"]
    assert start["gate_density"] == 1.0 and start["accuracy"] == dense_m["accuracy"]

    out = train(cfg, tmp_path / "g", progress=False)
    log = _log(tmp_path / "g")
    distill = [r["train"]["distill"] for r in log]
    peak = max(range(len(distill)), key=distill.__getitem__)
    assert peak < len(distill) - 1 and distill[-1] < 0.7 * distill[peak], distill  # switching off, then recovery
    assert out["flops_ratio"] < 0.6
    meta = json.loads((tmp_path / "g" / "bundle.json").read_text())
    assert meta["gated"] and meta["train_config"]["init_from"] == str(dense)


def test_decouple_refuses_what_does_not_fit(data, dense):
    with pytest.raises(ValueError, match="architectures must match"):
        decouple_from(_cfg(data, arch="vgg16", init_from=str(dense)))
    with pytest.raises(ValueError, match="init_bias"):
        decouple_from(_cfg(data, init_from=str(dense), gate=GateConfig(init_bias=-1.0)))
    with pytest.raises(ValueError, match="different dataset"):
        decouple_from(_cfg(data, init_from=str(dense)), dataset_fingerprint="0" * 64)
    with pytest.raises(ValueError, match="needs a teacher"):
        _cfg(data, distill=0.5)
    with pytest.raises(ValueError, match="distill_features > 0 needs a teacher"):
        _cfg(data, distill_features=1.0)
    with pytest.raises(ValueError, match="distill_features=-1.0 must be >= 0"):
        _cfg(data, init_from=str(dense), distill_features=-1.0)


def _hint_to_teacher(run: Path, teacher: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        student = load_bundle(run).model.forward_path(x).penultimate
        return float(feature_hint_loss(student, teacher.forward_features(x)[1]))


def test_feature_hint_starts_at_zero_and_keeps_the_student_near_the_teacher(data, dense, tmp_path):
    cfg = _cfg(data, epochs=3, init_from=str(dense), distill=0.5, target_flops=0.3, align_mode="onesided")
    hinted = replace(cfg, distill_features=5.0)
    model, _, teacher, _ = decouple_from(hinted)
    x = load_dataset("npz", "test", str(data)).float_images(slice(0, 100))
    model.eval()
    with torch.no_grad():
        out = model.forward_path(x)
        y = torch.zeros(100, dtype=torch.long)
        _, terms = objective(model, out, y, hinted, teacher=teacher.forward_features(x))
    assert terms["hint"] < 1e-10  # every gate on: the teacher's features, exactly

    train(cfg, tmp_path / "plain", progress=False)
    train(hinted, tmp_path / "hinted", progress=False)
    assert all("hint" in r["train"] for r in _log(tmp_path / "hinted"))
    assert not any("hint" in r["train"] for r in _log(tmp_path / "plain"))
    plain, kept = _hint_to_teacher(tmp_path / "plain", teacher, x), _hint_to_teacher(tmp_path / "hinted", teacher, x)
    assert kept < 0.7 * plain, (kept, plain)  # the same run, same seed: the hint holds the features near the teacher's


def test_a_continued_run_keeps_its_starts_validation_split_whatever_its_seed(data, dense, tmp_path):
    """Another seed must not move the split: the new validation images would be ones the start trained on."""
    from detector.data import train_val_split
    from detector.training.trainer import split_seed

    start = json.loads((dense / "bundle.json").read_text())["dataset"]
    cfg = _cfg(data, gated=False, epochs=1, train_subset=64, init_from=str(dense), lr=1e-3, seed=7)
    assert start["split_seed"] == 0 and split_seed(cfg) == 0 and split_seed(replace(cfg, init_from=None)) == 7
    train(cfg, tmp_path / "s7", progress=False)
    meta = json.loads((tmp_path / "s7" / "bundle.json").read_text())
    assert meta["dataset"]["split_seed"] == 0 and meta["train_config"]["seed"] == 7
    full = load_dataset("npz", "train", str(data))
    _, val_start = train_val_split(len(full), start["val_images"], 0)
    _, val_seed7 = train_val_split(len(full), start["val_images"], 7)
    assert not torch.equal(val_start, val_seed7)  # the seed alone would have moved it
    with pytest.raises(ValueError, match="keeps its start's split"):
        split_seed(replace(cfg, val_size=start["val_images"] + 1))


def test_dense_twin_continues_from_the_dense_start(data, dense, tmp_path):
    # the control for a decoupled model: the same start and the same extra epochs, no gates
    cfg = _cfg(data, gated=False, epochs=1, init_from=str(dense), lr=1e-3)
    model, _, teacher, digest = continue_dense(cfg)
    start = json.loads((dense / "bundle.json").read_text())
    assert teacher is None and digest == start["files"]["model.safetensors"]
    test = load_dataset("npz", "test", str(data))
    assert model_metrics(model.eval(), test)["accuracy"] == start["metrics"]["test"]["accuracy"]
    train(cfg, tmp_path / "twin", progress=False)
    meta = json.loads((tmp_path / "twin" / "bundle.json").read_text())
    assert not meta["gated"] and meta["train_config"]["init_from"] == str(dense)
    before, after = load_file(dense / "model.safetensors"), load_file(tmp_path / "twin" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    gated = tmp_path / "twin-of-gated"
    train(_cfg(data, epochs=1, train_subset=128), gated, progress=False)
    with pytest.raises(ValueError, match="gated bundle"):
        continue_dense(_cfg(data, gated=False, init_from=str(gated)))


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(data, tmp_path):
    # augmentation, logistic gate noise and a ramp: every RNG and schedule state must come back
    cfg = _cfg(
        data,
        epochs=3,
        train_subset=256,
        augment=("hflip", "shift"),
        target_flops=0.5,
        aux_warmup=0.5,
        align_mode="onesided",
        freeze_gates_epochs=1,
        gate=GateConfig(init_bias=0.5, noise="logistic"),
    )
    train(cfg, tmp_path / "whole", progress=False)
    assert not checkpoint_dir(tmp_path / "whole").exists()  # removed once the bundle is written
    assert train(cfg, tmp_path / "split", progress=False, stop_after=1) == {"stopped_after_epoch": 1}
    assert not (tmp_path / "split" / "model.safetensors").exists()
    at_one = load_file(str(next(checkpoint_dir(tmp_path / "split").glob("*.safetensors"))))
    assert train(cfg, tmp_path / "split", progress=False, resume=True, stop_after=2) == {"stopped_after_epoch": 2}
    train(replace(cfg, threads=2), tmp_path / "split", progress=False, resume=True)  # threads may differ
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert whole.keys() == split.keys()
    for k in whole:
        assert torch.allclose(whole[k].float(), split[k].float(), atol=1e-6), k
    assert [r["epoch"] for r in _log(tmp_path / "split")] == [1, 2, 3]
    # the last epoch froze the controlling modules: they are what they were at the end of epoch 2;
    # the rest of the network kept training after epoch 1
    assert not torch.equal(at_one["model.features.2.conv.weight"], split["features.2.conv.weight"])


def test_frozen_gates_stay_put(data, tmp_path):
    cfg = _cfg(data, epochs=2, train_subset=128, freeze_gates_epochs=1, target_flops=0.5)
    train(cfg, tmp_path / "r", progress=False, stop_after=1)
    before = load_file(str(next(checkpoint_dir(tmp_path / "r").glob("*.safetensors"))))
    train(cfg, tmp_path / "r", progress=False, resume=True)
    after = load_file(str(tmp_path / "r" / "model.safetensors"))
    acm = [k for k in after if ".acm." in k]
    assert acm and all(torch.equal(before["model." + k], after[k]) for k in acm)
    assert not torch.equal(before["model.features.3.conv.weight"], after["features.3.conv.weight"])


def test_corrupted_or_foreign_checkpoint_is_refused(data, tmp_path):
    cfg = _cfg(data, epochs=2, train_subset=128)
    run = tmp_path / "r"
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        train(cfg, run, progress=False, resume=True)
    train(cfg, run, progress=False, stop_after=1)
    tensors = next(checkpoint_dir(run).glob("*.safetensors"))
    original = tensors.read_bytes()
    with pytest.raises(CheckpointError, match="different training config.*lr"):
        train(_cfg(data, epochs=2, train_subset=128, lr=1e-2), run, progress=False, resume=True)
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    tensors.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="does not match its SHA-256.*corrupt"):
        train(cfg, run, progress=False, resume=True)
    tensors.write_bytes(original[: len(original) // 3])
    with pytest.raises(CheckpointError, match="SHA-256"):
        train(cfg, run, progress=False, resume=True)
    tensors.write_bytes(original)
    with pytest.raises(CheckpointError, match="unfinished run"):
        train(cfg, run, progress=False)  # starting over would discard it
    meta = checkpoint_dir(run) / "checkpoint.json"
    meta.write_text(meta.read_text()[:-40])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        train(cfg, run, progress=False, resume=True)


def test_tradeoff_report_from_tiny_bundles(data, dense, tiny_bundle, tmp_path):
    from detector.bundle import BundleError
    from detector.training.report import tradeoff_report

    half = tmp_path / "half"
    train(_cfg(data, epochs=1, train_subset=128, target_flops=0.5), half, progress=False)
    meta = {b: json.loads((b / "bundle.json").read_text()) for b in (dense, half, tiny_bundle)}
    evaluation = tmp_path / "eval.json"  # the two fields the report reads from `pathguard evaluate`'s report.json
    evaluation.write_text(
        json.dumps(
            {
                "bundle": {"model_sha256": meta[half]["files"]["model.safetensors"]},
                "results": {"path": {"fgsm": {"auroc": 0.9}, "pgd": {"auroc": 0.8}}},
            }
        )
    )
    out = tmp_path / "reports"
    rep = tradeoff_report([half, tiny_bundle], out, dense=dense, evaluations=[evaluation])
    assert {f.name for f in out.iterdir()} == {"tradeoff.json", "tradeoff.md", "tradeoff.png"}
    assert json.loads((out / "tradeoff.json").read_text()) == rep
    assert (out / "tradeoff.png").stat().st_size > 10_000
    by_name = {p["name"]: p for p in rep["points"]}
    dense_acc = meta[dense]["metrics"]["test"]["accuracy"]
    for b in (half, tiny_bundle):
        p, test = by_name[b.name], meta[b]["metrics"]["test"]
        assert p["accuracy"] == test["accuracy"] and p["flops_ratio"] == test["flops_ratio"]
        assert p["gap_to_dense_points"] == round(100 * (dense_acc - test["accuracy"]), 3)
        assert p["hamming_separation"] == test["hamming_other_class"] - test["hamming_same_class"]
        assert p["path_head_accuracy"] == test["path_head_accuracy"]
    assert by_name["half"]["detection"]["auroc"] == {"fgsm": 0.9, "pgd": 0.8}
    assert "detection" not in by_name[tiny_bundle.name]
    assert [p["flops_ratio"] for p in rep["points"]] == sorted((p["flops_ratio"] for p in rep["points"]), reverse=True)
    md = (out / "tradeoff.md").read_text()
    assert "| half |" in md and "(dense twin)" in md and "0.900" in md
    assert rep["dense"][0]["name"] == dense.name and by_name["half"]["dense_twin"] == dense.name
    # one twin per bundle: each gap against its own twin, and both twins in the table
    twin2 = tmp_path / "dense2"
    shutil.copytree(dense, twin2)
    t2 = json.loads((twin2 / "bundle.json").read_text())
    t2["metrics"]["test"]["accuracy"] = 0.99
    (twin2 / "bundle.json").write_text(json.dumps(t2))
    paired = tradeoff_report([half, tiny_bundle], tmp_path / "paired", dense=[dense, twin2])
    gaps = {p["name"]: (p["dense_twin"], p["gap_to_dense_points"]) for p in paired["points"]}
    assert gaps["half"] == (dense.name, round(100 * (dense_acc - meta[half]["metrics"]["test"]["accuracy"]), 3))
    tiny_acc = meta[tiny_bundle]["metrics"]["test"]["accuracy"]
    assert gaps[tiny_bundle.name] == ("dense2", round(100 * (0.99 - tiny_acc), 3))
    assert [d["name"] for d in paired["dense"]] == [dense.name, "dense2"]
    assert "(vs dense2)" in (tmp_path / "paired" / "tradeoff.md").read_text()
    assert paired["seed_groups"] == [] and rep["seed_groups"] == []
    # the same recipe under another seed: one seed group, with the spread of the two runs
    half_s1 = tmp_path / "half-s1"
    train(_cfg(data, epochs=1, train_subset=128, target_flops=0.5, seed=1), half_s1, progress=False)
    seeded = tradeoff_report([half, half_s1, tiny_bundle], tmp_path / "seeded", dense=dense)
    (group,) = seeded["seed_groups"]
    accs = [json.loads((b / "bundle.json").read_text())["metrics"]["test"]["accuracy"] for b in (half, half_s1)]
    assert group["bundles"] == ["half", "half-s1"] and group["seeds"] == [0, 1]
    assert group["accuracy"] == {"mean": sum(accs) / 2, "min": min(accs), "max": max(accs)}
    assert "One recipe, seeds 0, 1 (half, half-s1)" in (tmp_path / "seeded" / "tradeoff.md").read_text()
    # another seed of another recipe (a loss weight that is not among the report's columns) joins no group
    other = tmp_path / "half-mi"
    shutil.copytree(half_s1, other)
    m = json.loads((other / "bundle.json").read_text())
    m["train_config"].update(seed=2, w_mi=2 * m["train_config"]["w_mi"], threads=3)
    (other / "bundle.json").write_text(json.dumps(m))
    mixed = tradeoff_report([half, half_s1, other], tmp_path / "mixed", dense=dense)
    assert [g["bundles"] for g in mixed["seed_groups"]] == [["half", "half-s1"]]
    m["train_config"]["w_mi"] /= 2  # the same recipe run on more threads: a third seed of it
    del m["train_config"]["adversarial_eps"]  # a bundle from before a setting existed: at its default, the same
    (other / "bundle.json").write_text(json.dumps(m))
    regrouped = tradeoff_report([half, half_s1, other], tmp_path / "regrouped", dense=dense)
    assert [g["seeds"] for g in regrouped["seed_groups"]] == [[0, 1, 2]]
    m["train_config"]["no_such_setting"] = 1
    (other / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="half-mi: train_config .*no_such_setting"):
        tradeoff_report([half, other], tmp_path / "unread", dense=dense)
    with pytest.raises(ValueError, match="3 dense twins for 2 bundles"):
        tradeoff_report([half, tiny_bundle], out, dense=[dense, twin2, dense])
    with pytest.raises(ValueError, match="reference must be the dense twin"):
        tradeoff_report([half], out, dense=tiny_bundle)
    (half / "model.safetensors").write_bytes((half / "model.safetensors").read_bytes()[:-8])
    with pytest.raises(BundleError, match="SHA-256"):
        tradeoff_report([half], out, dense=dense)
