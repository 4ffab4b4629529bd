"""Registry of adversarial attacks over torchattacks, with budgets in [0, 1] pixel space.

Each entry names the torchattacks class, its default parameters and the norm its budget is in.
Minimum-perturbation attacks (CW, DeepFool) have no fixed budget; their perturbation size is reported.
torchattacks is imported when an attack is built, not with this module: the server, whose command line
parses these names, runs without it (the server image leaves it out).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AttackInfo:
    cls: str  # the attack's class, module.Class: imported when an attack is built
    defaults: dict[str, Any]
    norm: str | None  # "linf", "l2" or None (no fixed budget)
    reference: str
    family: str  # one of FAMILIES: what leave-one-family-out holds out together

    def budget(self, params: dict[str, Any]) -> float | None:
        return float(params["eps"]) if self.norm is not None else None


FAMILIES = ("gradient-sign-linf", "optimisation-l2", "minimal-perturbation", "query-based")

ATTACKS: dict[str, AttackInfo] = {
    "fgsm": AttackInfo("torchattacks.FGSM", {"eps": 0.1}, "linf", "Goodfellow et al. 2015", "gradient-sign-linf"),
    "bim": AttackInfo(
        "torchattacks.BIM",
        {"eps": 0.1, "alpha": 0.01, "steps": 20},
        "linf",
        "Kurakin et al. 2017",
        "gradient-sign-linf",
    ),
    "pgd": AttackInfo(
        "torchattacks.PGD",
        {"eps": 0.1, "alpha": 0.01, "steps": 20, "random_start": True},
        "linf",
        "Madry et al. 2018",
        "gradient-sign-linf",
    ),
    "pgdl2": AttackInfo(
        "torchattacks.PGDL2",
        {"eps": 1.5, "alpha": 0.15, "steps": 20, "random_start": True},
        "l2",
        "Madry et al. 2018, L2",
        "optimisation-l2",
    ),
    "cw": AttackInfo(
        "torchattacks.CW",
        {"c": 1.0, "kappa": 0.0, "steps": 100, "lr": 0.01},
        None,
        "Carlini & Wagner 2017, L2",
        "optimisation-l2",
    ),
    "deepfool": AttackInfo(
        "detector.attacks.deepfool.BatchedDeepFool",
        {"steps": 50, "overshoot": 0.02},
        None,
        "Moosavi-Dezfooli et al. 2016, L2 (batched; see detector.attacks.deepfool)",
        "minimal-perturbation",
    ),
    "apgd": AttackInfo(
        "torchattacks.APGD",
        {"eps": 0.1, "steps": 20, "norm": "Linf", "loss": "ce", "n_restarts": 1},
        "linf",
        "Croce & Hein 2020 (AutoAttack's APGD-CE)",
        "gradient-sign-linf",
    ),
    # Score-based black box: random square patches, no gradient. The query budget keeps the default
    # evaluation under 20 minutes on 2 cores (torchattacks' default is 5000).
    "square": AttackInfo(
        "torchattacks.Square",
        {"eps": 0.1, "n_queries": 300, "p_init": 0.8, "loss": "margin"},
        "linf",
        "Andriushchenko et al. 2020 (Square Attack, margin loss)",
        "query-based",
    ),
}


def _coerce(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class AttackSpec:
    """One attack with its parameters. ``label`` names it in reports (the text it was parsed from)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"attack={self.name!r} is not registered; choose from {sorted(ATTACKS)}")
        info = ATTACKS[self.name]
        unknown = set(self.params) - set(info.defaults)
        if unknown:
            raise ValueError(
                f"attack {self.name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(info.defaults)}"
            )
        full = {**info.defaults, **self.params}
        object.__setattr__(self, "params", full)
        if info.norm is not None and not 0 < float(full["eps"]) <= (1.0 if info.norm == "linf" else 100.0):
            raise ValueError(
                f"eps={full['eps']} for {self.name} must be in (0, 1] (Linf, [0,1] pixels)"
                if info.norm == "linf"
                else f"eps={full['eps']} for {self.name} must be > 0"
            )
        if not self.label:
            object.__setattr__(self, "label", self.name)

    @property
    def info(self) -> AttackInfo:
        return ATTACKS[self.name]

    @property
    def norm(self) -> str | None:
        return self.info.norm

    @property
    def family(self) -> str:
        return self.info.family

    @property
    def budget(self) -> float | None:
        return self.info.budget(self.params)

    def canonical(self) -> str:
        return json.dumps({"name": self.name, "params": self.params}, sort_keys=True)

    def build(self, model, seed: int = 0):
        params = dict(self.params)
        if self.name in ("apgd", "square"):
            params["seed"] = seed
        module, _, name = self.info.cls.rpartition(".")
        return getattr(importlib.import_module(module), name)(model, **params)


def parse_attack(text: str) -> AttackSpec:
    """``"pgd"`` or ``"pgd:eps=0.05,steps=40"`` -> :class:`AttackSpec`."""
    name, _, rest = text.strip().partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"attack parameter {item!r} in {text!r} must be key=value")
        params[key.strip()] = _coerce(value.strip())
    return AttackSpec(name.strip().lower(), params, text.strip())


def parse_attacks(text: str) -> list[AttackSpec]:
    """Comma-separated attacks; parameters follow a colon and are separated by ``;`` or ``,``.

    ``"fgsm,pgd:eps=0.05;steps=40,cw"`` gives three attacks.
    """
    specs, current = [], ""
    for token in text.split(","):
        if "=" in token and ":" not in token and current:
            current += "," + token
            continue
        if current:
            specs.append(current)
        current = token
    if current:
        specs.append(current)
    parsed = [parse_attack(s.replace(";", ",")) for s in specs if s.strip()]
    labels = [s.label for s in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"attacks {labels} name the same attack twice")
    return parsed
