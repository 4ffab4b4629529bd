"""Name -> builder registry of model variants (torchvision-style: duplicate names are refused)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MODELS: dict[str, Callable[..., Any]] = {}


def register_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(arch: str, *, gated: bool = True, gate: Any = None, **kwargs: Any):
    """Build a registered model. ``gated=False`` gives the dense twin (no controlling modules).

    ``gate`` is a :class:`GateConfig` or a dict of its fields; None means the defaults.
    """
    from .gates import GateConfig

    if arch not in _MODELS:
        raise ValueError(f"arch={arch!r} is not a registered model; choose from {list_models()}")
    if gated:
        gate = GateConfig(**gate) if isinstance(gate, dict) else (gate or GateConfig())
    else:
        gate = None
    return _MODELS[arch](gate=gate, **kwargs)
