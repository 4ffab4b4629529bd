"""Adversarial fine-tuning: part of every training batch replaced by its Linf attack on the classifier loss.

``--adversarial-eps E`` (``TrainConfig.adversarial_eps``) turns it on. For each batch a random
``adversarial_fraction`` of the images (default half) is replaced by an adversarial example within the Linf
ball of radius E; the rest stay clean:

- ``adversarial_steps`` = 1: FGSM from a uniform random start in the ball, step 1.25 E (Wong, Rice & Kolter
  2020, "Fast is better than free"), one gradient per image;
- ``adversarial_steps`` = k > 1: PGD, k steps of 2.5 E / k from a uniform random start (Madry et al. 2018).

The attack maximises the cross-entropy of the classifier's logits (the classifier loss; the auxiliary path
terms are not attacked) in eval mode, with straight-through gradients at the hard gates (the gates decide as
at inference; BatchNorm's running statistics are not moved by the attack's passes). Mixing clean and
adversarial images in one batch (Kurakin et al. 2017; Goodfellow et al. 2015 weighted them equally) keeps the
clean accuracy and the clean calculation paths trained: the path detector is fitted on clean paths and must
still find them typical. A distillation target, when there is one, is the teacher's answer on the *clean*
image, so an adversarial row learns the clean label's soft target.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageDataset
from ..models import straight_through
from .config import TrainConfig


def attack_batch(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, gen: torch.Generator) -> Tensor:
    """Linf adversarial examples (random start; FGSM for 1 step, PGD otherwise) of ``x`` in [0, 1] on the
    cross-entropy of ``model(x)``; the model's mode is restored and no parameter gradient is accumulated."""
    was_training = model.training
    model.eval()
    alpha = 1.25 * eps if steps == 1 else 2.5 * eps / steps
    start = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * eps
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    adv = torch.minimum(torch.maximum(x + start, lo), hi)
    gated = getattr(model, "gated", False)
    try:
        with straight_through(model) if gated else contextlib.nullcontext():
            for _ in range(steps):
                adv.requires_grad_(True)
                (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
                adv = torch.minimum(torch.maximum(adv.detach() + alpha * grad.sign(), lo), hi)
    finally:
        model.train(was_training)
    return adv.detach()


def mix_adversarial(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    """``x`` with a random ``cfg.adversarial_fraction`` of its rows replaced by their adversarial examples
    (``x`` itself when ``cfg.adversarial_eps`` is 0)."""
    if cfg.adversarial_eps <= 0:
        return x
    k = round(len(x) * cfg.adversarial_fraction)
    if k == 0:
        return x
    rows = torch.randperm(len(x), generator=gen)[:k].to(x.device)
    mixed = x.clone()
    mixed[rows] = attack_batch(model, x[rows], y[rows], eps=cfg.adversarial_eps, steps=cfg.adversarial_steps, gen=gen)
    return mixed


def robust_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int = 10, seed: int = 0, batch_size: int = 250
) -> float:
    """Accuracy of ``model`` under ``steps``-step PGD (random start) at Linf ``eps`` on images x, labels y."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        adv = attack_batch(model, xb, yb, eps=eps, steps=steps, gen=gen)
        with torch.no_grad():
            was = model.training
            model.eval()
            correct += int((model(adv).argmax(1) == yb).sum())
            model.train(was)
    return correct / max(len(x), 1)


ROBUST_TEST_IMAGES = 1000
ROBUST_TEST_STEPS = 10


def robust_test_metrics(model: nn.Module, test: ImageDataset, cfg: TrainConfig) -> dict:
    """Accuracy under 10-step PGD at the training budget (and half of it) on the first 1,000 test images."""
    n = min(ROBUST_TEST_IMAGES, len(test))
    x, y = test.float_images(slice(0, n)), test.labels[:n]
    eps = cfg.adversarial_eps
    out = {"n": n, "attack": f"pgd, {ROBUST_TEST_STEPS} steps of 2.5 eps / steps, random start", "accuracy": {}}
    for e in (eps / 2, eps):
        out["accuracy"][f"{e:g}"] = robust_accuracy(model, x, y, eps=e, steps=ROBUST_TEST_STEPS, seed=cfg.seed)
    return out
