"""Process-level settings: which device, how many CPU threads torch may use, and deterministic kernels."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs, or None when unlimited or unknown.

    cgroup v2 writes it as ``cpu.max`` ("max 100000" or "150000 100000"); cgroup v1, still the default on
    some nodes and container hosts, as ``cpu/cpu.cfs_quota_us`` (-1: unlimited) over ``cpu.cfs_period_us``.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for cpu in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota_us = int((cpu / "cpu.cfs_quota_us").read_text())
            return None if quota_us < 0 else quota_us / int((cpu / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
    return None


def available_cpus() -> int:
    """CPUs this process may really use: the affinity mask, capped by the cgroup CPU quota (v2 or v1).

    In a container with ``limits.cpu: 2`` on a 64-core node, ``os.cpu_count()`` says 64; letting torch
    start 64 threads then makes throughput collapse. The quota says 2.
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None or 0: :func:`available_cpus`); returns the number set."""
    n = threads or available_cpus()
    torch.set_num_threads(n)
    return n


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was asked for but torch sees no CUDA device")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device={name!r} must be 'auto', 'cpu' or 'cuda[:N]'")
    return torch.device(name)


def use_deterministic_kernels(device: torch.device) -> None:
    """Make training on ``device`` repeat itself for a given seed (a resumed run included).

    On the CPU it already does. On CUDA, cuDNN's autotuner and atomic-add kernels (a convolution's weight
    gradient, scatter and index_add) change the result from run to run; this asks for deterministic
    kernels, and for the fixed cuBLAS workspace their determinism needs (effective only if set before the
    process's first cuBLAS call, hence ``setdefault``). Ops without a deterministic kernel warn instead of
    failing.
    """
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
