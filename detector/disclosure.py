"""What a deployment reveals of each screening to its callers: the score policy.

The adversarial score is a gift to an attacker who can query the service: a random search on "misclassified
and not flagged" climbs it directly (see :mod:`detector.adaptive.query`). A deployment chooses how much of
each result its callers see:

- ``full``: everything, exact (probabilities, score, threshold, filter ratios, on request the path and its
  per-layer departure);
- ``rounded``: the score on a grid of step :data:`ROUND_STEP` anchored at the threshold, and probabilities
  and filter ratios rounded to the nearest multiple of the same step; no path, no departure;
- ``flag``: only the predicted class and the flag (no probabilities, score, threshold or ratios).

The flag and the predicted class are always exact. The rounded score is rounded *away from* the threshold
(``threshold + sign(m) * ceil(|m| / step) * step`` for the margin ``m = score - threshold``, clipped to
[0, 1]), so that a caller sees ``score > threshold`` exactly when the image is flagged, and learns of the
margin only which step-wide bin it lies in. The step 0.05 is in the score's own units: the shipped scores
are ``t / (1 + t)`` of ``t = -log p`` under clean calibration images, so near the default threshold (0.79,
``t`` = 3.8) one step spans about a factor 2.6 in the clean p-value; for the probabilities it is 5
percentage points. The one function that applies a policy, :func:`disclose`, is what the server answers
from and what the in-process query attacker attacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .screening import ScreenResult

SCORE_POLICIES = ("full", "rounded", "flag")
ROUND_STEP = 0.05
# what each policy reveals beyond the predicted class and the flag
REVEALS = {
    "full": frozenset({"probabilities", "scores", "threshold", "active_ratio", "flops_ratio", "paths", "departure"}),
    "rounded": frozenset({"probabilities", "scores", "threshold", "active_ratio", "flops_ratio"}),
    "flag": frozenset(),
}


def check_policy(policy: str) -> str:
    if policy not in SCORE_POLICIES:
        raise ValueError(f"score_policy={policy!r} must be one of {SCORE_POLICIES}")
    return policy


@dataclass
class Disclosure:
    """What a caller is told about N screened images under ``policy``; a field the policy withholds is None."""

    policy: str
    predictions: np.ndarray  # (N,) int64, exact
    flags: np.ndarray  # (N,) bool, exact
    probabilities: np.ndarray | None = None  # (N, K) float32
    scores: np.ndarray | None = None  # (N,) float
    threshold: float | None = None
    active_ratio: np.ndarray | None = None  # (N,)
    flops_ratio: np.ndarray | None = None  # (N,)
    paths: np.ndarray | None = None  # (N, G) uint8
    departure: np.ndarray | None = None  # (N, L)

    def __len__(self) -> int:
        return len(self.predictions)


def round_scores(scores: np.ndarray, threshold: float, step: float = ROUND_STEP) -> np.ndarray:
    """Scores on the grid ``threshold + k * step``, rounded away from the threshold and clipped to [0, 1]:
    the result exceeds ``threshold`` exactly where ``scores`` does."""
    margin = np.asarray(scores, dtype=np.float64) - threshold
    bins = np.ceil(np.abs(margin) / step)
    return np.clip(threshold + np.sign(margin) * bins * step, 0.0, 1.0)


def round_to(values: np.ndarray, step: float = ROUND_STEP) -> np.ndarray:
    """``values`` rounded to the nearest multiple of ``step`` (same dtype)."""
    values = np.asarray(values)
    return (np.round(values / step) * step).astype(values.dtype)


def disclose(result: ScreenResult, policy: str = "full", step: float = ROUND_STEP) -> Disclosure:
    """The part of ``result`` that ``policy`` reveals (see the module docstring)."""
    check_policy(policy)
    out = Disclosure(policy, result.predictions, result.flags)
    if policy == "full":
        out.probabilities, out.scores, out.threshold = result.probabilities, result.scores, result.threshold
        out.active_ratio, out.flops_ratio = result.active_ratio, result.flops_ratio
        out.paths, out.departure = result.paths, result.departure
    elif policy == "rounded":
        out.probabilities = round_to(result.probabilities, step)
        out.scores = round_scores(result.scores, result.threshold, step)
        out.threshold = result.threshold
        out.active_ratio, out.flops_ratio = round_to(result.active_ratio, step), round_to(result.flops_ratio, step)
    return out
