"""Bundles: round trip, self-description, and refusal of altered or incomplete bundles."""

import json
import shutil

import pytest
import torch

from detector import BundleError, load_bundle
from detector.bundle import read_meta


def test_round_trip_identical_outputs(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    a, b = load_bundle(tiny_bundle), load_bundle(copy)
    x = torch.rand(5, *a.input_shape)
    assert torch.equal(a.model(x), b.model(x))
    assert torch.equal(a.model.forward_path(x).hard_path, b.model.forward_path(x).hard_path)


def test_bundle_describes_itself(tiny_bundle):
    meta = read_meta(tiny_bundle)
    for key in (
        "arch",
        "arch_args",
        "train_config",
        "classes",
        "input_shape",
        "normalization",
        "dataset",
        "seed",
        "metrics",
        "files",
        "command",
    ):
        assert key in meta, key
    test = meta["metrics"]["test"]
    for key in ("accuracy", "gate_density", "layer_density", "flops_ratio", "path_head_accuracy"):
        assert key in test, key
    assert len(meta["dataset"]["fingerprint"]) == 64
    assert set(meta["files"]) >= {
        "model.safetensors",
        "detector.json",
        "detector.safetensors",
        "prototypes.json",
        "prototypes.safetensors",
    }


def test_altered_weights_refused_naming_file(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.safetensors does not match its SHA-256"):
        load_bundle(copy)


@pytest.mark.parametrize("victim", ["detector.json", "prototypes.safetensors"])
def test_missing_part_refused(tiny_bundle, tmp_path, victim):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    (copy / victim).unlink()
    with pytest.raises(BundleError, match=f"{victim} is missing"):
        load_bundle(copy)


@pytest.mark.parametrize("victim", ["model.safetensors", "detector.json", "prototypes.safetensors"])
def test_altered_part_refused(tiny_bundle, tmp_path, victim):
    """One flipped byte in any listed file fails its SHA-256 check (the file is still there and well-formed
    enough to be read, so only the digest can catch it)."""
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / victim).read_bytes())
    data[-2] ^= 0x01
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{victim} does not match its SHA-256"):
        load_bundle(copy)


def test_bad_metadata_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    (copy / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(copy)
    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    del meta["arch"]
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="'arch' missing"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")


def test_no_pickle_in_bundle(tiny_bundle):
    for f in tiny_bundle.iterdir():
        head = f.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"\x80\x02", f"{f.name} looks pickled"


def _readable_by_others(path) -> bool:
    return bool(path.stat().st_mode & 0o004)


def test_bundle_files_readable_by_other_users(tiny_bundle):
    # The container runs as a non-root user on a bundle written by root at build time.
    files = [p for p in tiny_bundle.iterdir() if p.is_file()]
    assert files
    assert all(_readable_by_others(p) for p in files), [(p.name, oct(p.stat().st_mode)) for p in files]


def test_default_bundle_complete_and_readable(default_bundle):
    bundle = load_bundle(default_bundle)
    assert bundle.detector() is not None and bundle.prototypes() is not None
    assert bundle.detector_record().attacks
    assert bundle.model_digest == read_meta(default_bundle)["files"]["model.safetensors"]
    assert bundle.meta["gated"] and bundle.meta["input_shape"] == [1, 28, 28]
    for name in read_meta(default_bundle)["files"]:
        assert _readable_by_others(default_bundle / name), name
