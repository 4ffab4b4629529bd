"""``detector.json``'s description of how a bundle's detector was fitted, as a typed record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..attacks.registry import AttackSpec

_KEYS = (
    "classifier",
    "feature_groups",
    "target_fpr",
    "attacks",
    "fit_images",
    "calibration_images",
    "per_attack",
    "fit_seconds",
    "hardened",
)


@dataclass
class DetectorRecord:
    """What ``pathguard fit-detector`` recorded next to the detector's own state (threshold, scorer).

    attacks : the attacks whose examples the detector learnt from, in the order they were run.
    fit_images, calibration_images : which validation images (``set``, ``n_clean`` / ``n``, ``skip``, ``seed``),
        so that the training rows can be rebuilt (hardening does).
    hardened : set on a hardened copy (``pathguard adaptive --save-hardened``).
    """

    classifier: str = "?"
    feature_groups: list[str] = field(default_factory=list)
    target_fpr: float | None = None
    attacks: list[AttackSpec] = field(default_factory=list)
    fit_images: dict[str, Any] = field(default_factory=dict)
    calibration_images: dict[str, Any] = field(default_factory=dict)
    per_attack: dict[str, Any] = field(default_factory=dict)
    fit_seconds: float | None = None
    hardened: dict[str, Any] | None = None

    @classmethod
    def from_info(cls, info: dict) -> DetectorRecord:
        """The record within a ``detector.json`` (other keys, the estimator's state, are ignored)."""
        values = {k: info[k] for k in _KEYS if k in info}
        values["attacks"] = [AttackSpec(a["name"], dict(a["params"]), a["label"]) for a in info.get("attacks", [])]
        return cls(**values)

    def to_info(self) -> dict:
        """The JSON keys of this record (``None`` fields left out), to merge with the estimator's state."""
        out = {k: getattr(self, k) for k in _KEYS if getattr(self, k) is not None}
        out["attacks"] = [{"label": a.label, "name": a.name, "params": a.params} for a in self.attacks]
        return out
