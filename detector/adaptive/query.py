"""A query-only attacker: Square-style random search on what the service answers.

The attacker knows no weights and no gradients. It sends images and reads back what the deployment's score
policy reveals (:mod:`detector.disclosure`): the probabilities, the adversarial score and the threshold under
``full``; the same on a 0.05 grid under ``rounded``; only the predicted class and the flag under ``flag``.
It searches the Linf ball with the Square attack's proposal (Andriushchenko et al. 2020, Linf version: a
random square window of the perturbation set to ``+-eps`` per channel, the window shrinking on the paper's
schedule rescaled to the budget) and keeps a proposal when the loss built from those outputs alone does not
get worse:

    loss = max(m, -kappa) + lam * d

- ``m``: the classifier margin ``log p_y - max_{j != y} log p_j`` (= the logit margin when the
  probabilities are exact; on rounded ones each is floored at half a step), or ``1[correct]`` when no
  probabilities are revealed;
- ``d``: ``max(logit(score) - logit(threshold) + tau, 0)``, the score's excess over the threshold in log-odds
  (so that one ``lam`` means the same on a detector whose threshold sits at 0.004 as on one at 0.79), or
  ``1[flagged]`` when no score is revealed.

Ties are accepted (a random walk across the plateaus that rounding creates). An image is done as soon as
the service answers "misclassified and not flagged" for it: the attacker sees that too. Every image
evaluated counts as one query, the first (the starting point) included.

Oracles: :class:`ScreenerOracle` (in process, the screening function and the disclosure the server answers
from) and :class:`ClientOracle` (a running server through :class:`service.client.PathGuardClient`).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..disclosure import ROUND_STEP, Disclosure, check_policy, disclose
from ..screening import Screener

INITS = ("clean", "stripes")


class Oracle(Protocol):
    """Answers images (N, C, H, W) in [0, 1] with what the deployment reveals of each."""

    def __call__(self, images: Tensor) -> Disclosure: ...


class ScreenerOracle:
    """In process: the server's screening function (:meth:`Screener.screen`) and :func:`disclose`."""

    def __init__(self, screener: Screener, policy: str = "full") -> None:
        self.screener = screener
        self.policy = check_policy(policy)

    def __call__(self, images: Tensor) -> Disclosure:
        shown = disclose(self.screener.screen(images, validate=False), self.policy)
        # what the wire carries: the own API's score and threshold are float32 (so are KServe's outputs)
        if shown.scores is not None and shown.threshold is not None:
            shown.scores = shown.scores.astype(np.float32).astype(np.float64)
            shown.threshold = float(np.float32(shown.threshold))
        return shown


class ClientOracle:
    """A running server, through the real client (``service.client.PathGuardClient`` or anything with its
    ``screen``); calls hold at most ``per_call`` images (the server's ``max_images_per_request``)."""

    def __init__(self, client: Any, per_call: int = 64) -> None:
        self.client = client
        self.per_call = per_call
        self.calls = 0

    def __call__(self, images: Tensor) -> Disclosure:
        x = images.detach().cpu().numpy().astype(np.float32)
        results = []
        for start in range(0, len(x), self.per_call):
            results += self.client.screen(x[start : start + self.per_call])
            self.calls += 1
        policy = results[0].score_policy
        shown = Disclosure(
            policy,
            np.array([r.class_index for r in results], dtype=np.int64),
            np.array([r.is_adversarial for r in results], dtype=bool),
        )
        if policy != "flag":
            shown.probabilities = np.stack([r.probabilities for r in results])
            shown.scores = np.array([r.adversarial_score for r in results], dtype=np.float64)
            shown.threshold = float(results[0].threshold)
        return shown


def query_loss(
    shown: Disclosure, labels: np.ndarray, *, lam: float, kappa: float, tau: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(loss (N,), success (N,)) of the answers ``shown`` for true ``labels``: see the module docstring."""
    rows = np.arange(len(labels))
    correct = shown.predictions == labels
    if shown.probabilities is not None:
        floor = ROUND_STEP / 2 if shown.policy == "rounded" else 1e-30
        logp = np.log(np.maximum(shown.probabilities.astype(np.float64), floor))
        true = logp[rows, labels]
        logp[rows, labels] = -np.inf
        margin = true - logp.max(1)
    else:
        margin = correct.astype(np.float64)
    if shown.scores is not None and shown.threshold is not None:
        excess = np.maximum(_logit(shown.scores) - _logit(np.float64(shown.threshold)) + tau, 0.0)
    else:
        excess = shown.flags.astype(np.float64)
    return np.maximum(margin, -kappa) + lam * excess, ~correct & ~shown.flags


def _logit(s: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(s, dtype=np.float64), 1e-9, 1 - 1e-9)
    return np.log(s) - np.log1p(-s)


def p_selection(p_init: float, it: int, budget: int) -> float:
    """Fraction of the pixels in the next square (the paper's schedule for 10,000 queries, rescaled)."""
    it = int(it / budget * 10000)
    for edge, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128)):
        if it <= edge:
            return p_init / div
    return p_init / (256 if it <= 8000 else 512)


@dataclass
class QueryAttackResult:
    adversarial: Tensor  # (N, C, H, W): each image's last accepted point (its first success, if any)
    success: np.ndarray  # (N,) bool: the service answered "misclassified and not flagged"
    queries: np.ndarray  # (N,) int: queries spent on each image (up to its success, or the whole budget)
    seconds: float


def _seed(seed: int, eps: float, image: int) -> int:
    return int.from_bytes(hashlib.sha256(f"query:{seed}:{eps}:{image}".encode()).digest()[:4], "little")


class SquareQueryAttack:
    """Square-style Linf random search against an :class:`Oracle` (see the module docstring).

    Parameters
    ----------
    oracle : what the attacker can query.
    eps : Linf budget in [0, 1] pixels.
    budget : queries per image, the starting point included.
    p_init : initial fraction of pixels in a square (0.05, the paper's Linf default).
    lam, kappa, tau : weights of the loss (module docstring).
    init : ``"stripes"`` starts at the paper's vertical stripes of +-eps; ``"clean"`` at the image itself.
    restore : probability that a proposal sets its window back to the clean pixels instead of a vertex.

    The defaults were chosen on 30 correctly classified *validation* images of the default bundle (eps 0.1,
    1,000 queries, policy ``full``): stripes 63% against 43% from the clean image, at lam 1, kappa 2, tau 0.5.
    """

    def __init__(
        self,
        oracle: Oracle | Callable[[Tensor], Disclosure],
        *,
        eps: float,
        budget: int = 1000,
        p_init: float = 0.05,
        lam: float = 1.0,
        kappa: float = 2.0,
        tau: float = 0.5,
        init: str = "stripes",
        restore: float = 0.0,
    ) -> None:
        if not 0 < eps <= 1:
            raise ValueError(f"eps={eps} must be in (0, 1]")
        if budget < 1:
            raise ValueError(f"budget={budget} must be >= 1 query per image")
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init={p_init} must be in (0, 1]")
        if lam < 0 or kappa < 0:
            raise ValueError(f"lam={lam} and kappa={kappa} must be >= 0")
        if init not in INITS:
            raise ValueError(f"init={init!r} must be one of {INITS}")
        self.oracle = oracle
        self.eps, self.budget, self.p_init = float(eps), int(budget), float(p_init)
        self.lam, self.kappa, self.tau, self.init = float(lam), float(kappa), float(tau), init
        if not 0 <= restore < 1:
            raise ValueError(f"restore={restore} must be in [0, 1)")
        self.restore = float(restore)

    def describe(self) -> dict:
        return {
            "attack": "square-query",
            "eps": self.eps,
            "budget": self.budget,
            "p_init": self.p_init,
            "lam": self.lam,
            "kappa": self.kappa,
            "tau": self.tau,
            "init": self.init,
            "restore": self.restore,
        }

    def _loss(self, x: Tensor, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return query_loss(self.oracle(x), y, lam=self.lam, kappa=self.kappa, tau=self.tau)

    # Over 60 lines on purpose: the Square attack's loop reads best in one piece, as in the paper's listing.
    def __call__(
        self, images: Tensor, labels: Tensor, *, seed: int = 0, ids: np.ndarray | None = None
    ) -> QueryAttackResult:
        """Attack images (N, C, H, W) in [0, 1] with true labels (N,).

        Each image draws its proposals from its own generator, seeded by ``seed``, eps and its id (``ids``,
        default its position): an image meets the same proposals whichever other images are attacked with it,
        so that policies compared on one image set face the same random search (common random numbers).
        """
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images must be (N, C, H, W) with N labels; got {tuple(images.shape)} and {len(labels)}")
        t0 = time.perf_counter()
        x0 = images.detach().cpu().float()
        y = labels.detach().cpu().numpy().astype(np.int64)
        n, c, h, w = x0.shape
        ids = np.arange(n) if ids is None else np.asarray(ids)
        gens = [torch.Generator().manual_seed(_seed(seed, self.eps, int(i))) for i in ids]
        lo, hi = (x0 - self.eps).clamp(0, 1), (x0 + self.eps).clamp(0, 1)

        def sign(gen: torch.Generator, *shape: int) -> Tensor:
            return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).float() * self.eps

        x = x0.clone()
        if self.init == "stripes":
            stripes = torch.stack([sign(g, c, 1, w) for g in gens])
            x = torch.minimum(torch.maximum(x0 + stripes, lo), hi)
        loss, success = self._loss(x, y)
        queries = np.ones(n, dtype=np.int64)
        for it in range(1, self.budget):
            active = np.flatnonzero(~success)
            if not len(active):
                break
            p = p_selection(self.p_init, it, self.budget)
            side = min(max(int(round(math.sqrt(p * h * w))), 1), h - 1, w - 1)
            cand = x[active].clone()
            for row, i in enumerate(active.tolist()):
                gen = gens[i]
                r0 = int(torch.randint(0, h - side + 1, (1,), generator=gen))
                c0 = int(torch.randint(0, w - side + 1, (1,), generator=gen))
                window = (slice(None), slice(r0, r0 + side), slice(c0, c0 + side))
                now = x[i][window]
                for _ in range(16):  # a proposal that changes nothing wastes a query: draw the signs again
                    step = sign(gen, c, 1, 1)
                    if self.restore and float(torch.rand(1, generator=gen)) < self.restore:
                        step = torch.zeros_like(step)  # the window back to the clean pixels
                    new = (x0[i][window] + step).clamp(lo[i][window], hi[i][window])
                    if (new - now).abs().max() > 1e-7:
                        break
                cand[row][window] = new
            new_loss, new_success = self._loss(cand, y[active])
            queries[active] += 1
            keep = (new_loss <= loss[active]) | new_success
            x[active[keep]] = cand[keep]
            loss[active[keep]] = new_loss[keep]
            success[active] = new_success
        return QueryAttackResult(x, success, queries, time.perf_counter() - t0)
