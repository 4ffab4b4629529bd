"""Interpretation (METHOD.md section 3.1): per-class filter usage, class-to-class path similarity,
class-specific vs shared filters, and single inputs against their class prototype; ``pathguard explain``.

``explain``, ``ExplainConfig`` and ``bundle_prototypes`` load on first use, so that registering the command
does not import matplotlib.
"""

from typing import Any

from .analysis import (
    Departure,
    Specificity,
    cosine_matrix,
    departures,
    filter_order,
    jaccard_matrix,
    layer_frequencies,
    similarities,
    similarity,
    specificity,
)

__all__ = [
    "Departure",
    "ExplainConfig",
    "Specificity",
    "bundle_prototypes",
    "cosine_matrix",
    "departures",
    "explain",
    "filter_order",
    "jaccard_matrix",
    "layer_frequencies",
    "similarities",
    "similarity",
    "specificity",
]


def __getattr__(name: str) -> Any:
    if name in ("ExplainConfig", "bundle_prototypes", "explain"):
        from . import explainer as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
