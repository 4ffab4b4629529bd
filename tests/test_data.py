"""Dataset loaders read tiny files written here, in each supported format."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from detector.data import DatasetNotFound, load_dataset, train_val_split
from detector.data.formats import read_idx


def _write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n), gz)
    train = load_dataset("mnist", "train", tmp_path)
    test = load_dataset("fashion-mnist", "test", tmp_path)
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (5, 1, 28, 28)
    assert test.classes[0] == "T-shirt/top"
    x = train.float_images()
    assert x.min() >= 0 and x.max() <= 1


def test_idx_refuses_truncated(tmp_path):
    _write_idx(tmp_path / "x", np.zeros((3, 4, 4)), False)
    data = (tmp_path / "x").read_bytes()
    (tmp_path / "x").write_bytes(data[:-5])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "x")


def test_cifar10_python_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    train = load_dataset("cifar10", "train", tmp_path)
    assert train.images.shape == (20, 3, 32, 32)
    assert train.classes[3] == "c3"


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_dataset("cifar10", "test", tmp_path)


def test_image_folder(tmp_path):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                value = 40 * i + (100 if cls == "dog" else 0)
                Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(d / f"{i}.png")
    data = load_dataset("image-folder", "train", tmp_path)
    assert data.images.shape == (4, 3, 8, 8)
    assert data.classes == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 1, 1]


def test_npz_float_and_uint8(tmp_path):
    np.savez(tmp_path / "train.npz", images=np.random.rand(6, 2, 5, 5).astype(np.float32), labels=np.arange(6) % 3)
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 5, 5), np.uint8), y=np.array([0, 1]))
    train, test = load_dataset("npz", "train", tmp_path), load_dataset("npz", "test", tmp_path)
    assert train.images.shape == (6, 2, 5, 5) and train.classes == ["0", "1", "2"]
    assert test.images.shape == (2, 1, 5, 5)
    np.savez(tmp_path / "bad.npz", images=np.full((1, 1, 2, 2), 3.0), labels=np.zeros(1, int))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_dataset("npz", "train", tmp_path / "bad.npz")


def test_missing_dataset_says_what_to_do(tmp_path):
    with pytest.raises(DatasetNotFound, match="mnist"):
        load_dataset("mnist", "train", tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        load_dataset("imagenet", "train", tmp_path)


def test_split_deterministic_and_disjoint():
    a_tr, a_va = train_val_split(100, 20, seed=3)
    b_tr, b_va = train_val_split(100, 20, seed=3)
    c_tr, c_va = train_val_split(100, 20, seed=4)
    assert torch.equal(a_va, b_va) and not torch.equal(a_va, c_va)
    assert len(set(a_tr.tolist()) & set(a_va.tolist())) == 0
    assert sorted(a_tr.tolist() + a_va.tolist()) == list(range(100))
