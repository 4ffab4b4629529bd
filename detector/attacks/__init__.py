"""Adversarial attacks (torchattacks) with budgets in [0, 1] pixel space."""

from .noise import noisy_like
from .registry import ATTACKS, FAMILIES, AttackSpec, parse_attack, parse_attacks
from .runner import AttackResult, cached_attack, load_result, run_attack, save_result

__all__ = [
    "ATTACKS",
    "FAMILIES",
    "AttackResult",
    "AttackSpec",
    "cached_attack",
    "load_result",
    "noisy_like",
    "parse_attack",
    "parse_attacks",
    "run_attack",
    "save_result",
]
