"""Acceleration (METHOD.md section 3.2): run only the filters whose gate is on.

:class:`SkippingEngine` executes a gated model skipping switched-off filters and matches the masked
computation up to rounding; :func:`set_gate_densities` gives an untrained model realistic gates for tests
and benchmarks.
"""

from .engine import (
    BATCH_MODES,
    EXECUTORS,
    Compact,
    EngineConfig,
    EngineConv,
    SkippingEngine,
    build_engine,
    fold_batchnorm,
    register_executor,
)
from .gates import force_gates, set_gate_densities

__all__ = [
    "BATCH_MODES",
    "EXECUTORS",
    "Compact",
    "EngineConfig",
    "EngineConv",
    "SkippingEngine",
    "build_engine",
    "fold_batchnorm",
    "force_gates",
    "register_executor",
    "set_gate_densities",
]
