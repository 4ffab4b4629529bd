"""Readers of the on-disk formats: IDX (MNIST family), CIFAR-10 batches, image folders, .npz."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzip), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {arr.size} values")
    return arr.reshape(dims)


class _ArraysOnly(pickle.Unpickler):
    """Unpickler that admits only numpy arrays and builtin containers.

    CIFAR-10's "python version" is pickled; this is the allow-list approach of Python's own
    documentation (Restricting Globals), so a crafted batch file cannot run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    with open(path, "rb") as f:
        d = _ArraysOnly(f, encoding="bytes").load()
    images = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(d[b"labels"], dtype=np.int64)


def read_cifar_meta(path: Path) -> list[str]:
    with open(path, "rb") as f:
        d = _ArraysOnly(f, encoding="bytes").load()
    return [n.decode() for n in d[b"label_names"]]


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """A ``.npz`` with ``images`` (N, C, H, W) or (N, H, W) and ``labels`` (N,); ``classes`` optional.

    ``x``/``y`` are accepted as aliases. Loaded with ``allow_pickle=False``.
    """
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        ik = "images" if "images" in keys else "x" if "x" in keys else None
        lk = "labels" if "labels" in keys else "y" if "y" in keys else None
        if ik is None or lk is None:
            raise ValueError(f"{path}: needs arrays 'images' and 'labels' (or 'x' and 'y'), has {sorted(keys)}")
        images, labels = z[ik], z[lk]
        classes = [str(c) for c in z["classes"]] if "classes" in keys else None
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"{path}: images must be (N, C, H, W) or (N, H, W), got {images.shape}")
    return images, labels.astype(np.int64), classes
