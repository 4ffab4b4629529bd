"""Adaptive attack 1: PGD on the classifier's loss plus the detector's (surrogate) logit."""

from __future__ import annotations

from torch import Tensor

from ..models import PathOutput
from .base import AdaptiveAttack


class DetectorPGD(AdaptiveAttack):
    """Linf PGD against classifier + path detector (Carlini & Wagner 2017, "Adversarial Examples Are Not
    Easily Detected"; Tramer et al. 2020, "On Adaptive Attacks to Adversarial Example Defenses").

    Minimises, per image, ``classifier term + lam * max(z(x) - z_thr + kappa, 0)`` where z is the logit of the
    detector's score (exact for logistic regression, a fitted surrogate for tree ensembles) and z_thr the
    logit of the calibrated threshold: the detector term pushes the score under the threshold and then
    stops, and the margin classifier term stops once the input is misclassified, so each step spends its
    budget on the constraint still violated. Gradients pass the hard gates straight through to the soft
    gates (BPDA). Budget: Linf ``eps`` in [0, 1] pixel space; images stay in [0, 1].
    """

    name = "detector-pgd"

    def terms(self, out: PathOutput, X: Tensor, labels: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        sur = self.pipeline.surrogate
        evade = (sur.logit(X) - sur.threshold_logit + self.kappa).clamp_min(0)
        return self.classifier_term(out.logits, labels, None), evade
