"""A training checkpoint after every epoch, and resuming from it (no pickle).

``<run>/checkpoint/checkpoint.json`` describes the state: format and version, the epoch and optimizer
step it ends, the training config, the optimizer's non-tensor state (param groups), the scheduler's
state, extra run facts (e.g. the teacher bundle's digest), and the SHA-256 of the tensor file it points
to. ``checkpoint-<epoch>.safetensors`` holds every tensor: model weights, optimizer moments and the
random-number generators' states. The JSON is written last, by atomic rename, so a run killed mid-write
leaves the previous checkpoint usable; loading verifies everything and refuses with
:class:`CheckpointError` what does not fit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..bundle import _save_tensors, _write_json, read_document, sha256_file
from .config import TrainConfig

FORMAT = "pathguard-checkpoint"
VERSION = 1
DIR = "checkpoint"
META = "checkpoint.json"
# settings that may change between a run and its resumption without changing its result
_MAY_DIFFER = {"threads", "device"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says which file and why."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / DIR


def has_checkpoint(run_dir: str | Path) -> bool:
    return (checkpoint_dir(run_dir) / META).is_file()


def read_config(run_dir: str | Path) -> TrainConfig:
    """The training config a checkpoint was written with (to resume without repeating every flag)."""
    return TrainConfig.from_dict(_read_meta(checkpoint_dir(run_dir))["train_config"])


def save_checkpoint(
    run_dir: str | Path,
    *,
    epoch: int,
    step: int,
    cfg: TrainConfig,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    gen: torch.Generator,
    extra: dict | None = None,
) -> Path:
    """Write the state at the end of ``epoch`` (replacing the previous checkpoint); returns the JSON path."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_sd = opt.state_dict()
    plain_state: dict[str, dict] = {}
    for pid, st in opt_sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                plain_state.setdefault(str(pid), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = gen.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    name = f"checkpoint-{epoch:04d}.safetensors"
    _save_tensors(d / name, tensors)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "epoch": epoch,
        "step": step,
        "train_config": cfg.to_dict(),
        "optimizer": {"param_groups": opt_sd["param_groups"], "state": plain_state},
        "scheduler": sched.state_dict(),
        "extra": extra or {},
        "tensors": name,
        "sha256": sha256_file(d / name),
    }
    try:
        json.dumps(meta)
    except TypeError as exc:  # a scheduler or optimizer holding something JSON cannot say: refuse, never pickle
        raise CheckpointError(f"checkpoint state is not JSON-serialisable: {exc}") from None
    _write_json(d / META, meta)
    for old in d.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink()
    return d / META


_NEED = {
    "format": str,
    "version": int,
    "epoch": int,
    "step": int,
    "train_config": dict,
    "optimizer": dict,
    "scheduler": dict,
    "extra": dict,
    "tensors": str,
    "sha256": str,
}


def _read_meta(d: Path) -> dict:
    path = d / META
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {path} not found")
    meta = read_document(
        path, required=_NEED, fmt=FORMAT, version=VERSION, error=CheckpointError, where=f"checkpoint {path}"
    )
    if Path(meta["tensors"]).name != meta["tensors"]:
        raise CheckpointError(f"checkpoint {path}: tensor file name {meta['tensors']!r} must not contain a path")
    return meta


def _config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    now = cfg.to_dict()
    keys = sorted((set(saved) | set(now)) - _MAY_DIFFER)
    return [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def load_checkpoint(
    run_dir: str | Path,
    *,
    cfg: TrainConfig,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    gen: torch.Generator,
) -> dict:
    """Restore model, optimizer, scheduler and RNG states in place; returns the checkpoint's JSON.

    Refuses (CheckpointError) a checkpoint whose files are missing, altered or unreadable, or that was
    written with a different training config (only ``threads`` and ``device`` may differ).
    """
    d = checkpoint_dir(run_dir)
    meta = _read_meta(d)
    where = d / META
    diffs = _config_differences(meta["train_config"], cfg)
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} was written by a different training config; resuming would "
            f"not continue the same run: {'; '.join(diffs)}"
        )
    tensor_path = d / meta["tensors"]
    if not tensor_path.is_file():
        raise CheckpointError(f"checkpoint {where}: its tensor file {tensor_path.name} is missing")
    actual = sha256_file(tensor_path)
    if actual != meta["sha256"]:
        raise CheckpointError(
            f"checkpoint {where}: {tensor_path.name} does not match its SHA-256 (expected "
            f"{meta['sha256'][:16]}..., found {actual[:16]}...): the file was altered or is corrupt"
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {where}: cannot read {tensor_path.name}: {exc}") from None
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for pid, extra in meta["optimizer"]["state"].items():
            state.setdefault(int(pid), {}).update(extra)
        groups = meta["optimizer"]["param_groups"]
        for g in groups:
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        opt.load_state_dict({"state": state, "param_groups": groups})
        sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        gen.set_state(tensors["rng.data"])
        cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {where} does not fit this run's model or optimizer: {exc}") from None
    return meta


def remove_checkpoint(run_dir: str | Path) -> None:
    """Delete the checkpoint of a finished run (the bundle holds what it was for)."""
    d = checkpoint_dir(run_dir)
    if d.is_dir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
