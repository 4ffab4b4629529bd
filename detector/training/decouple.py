"""Decoupling a trained dense model: a gated twin that starts from its weights, with every gate on.

The gated network of the same architecture gets the dense bundle's conv, BN and head weights; its
controlling modules and path head are new. The last Linear of every controlling module starts with zero
weights and a positive bias, so every gate is on for every input and the gated net computes exactly what
the dense one does: fine-tuning starts at the dense accuracy, and the FLOPs target, ramped in, switches
filters off from there. The dense model stays the teacher of the distillation term.

The biases are not all equal (choice): with equal biases and zero weights every gate of a layer gets the
same push and, under Adam's per-parameter step, all cross zero at the same step, switching the whole
layer off at once. Each filter's bias is instead ``init_bias * (0.5 + rank)``, rank in [0, 1] of the
filter's expected output in the dense model, ``E[relu(N(beta, gamma^2))] = gamma phi(beta/gamma) +
beta Phi(beta/gamma)`` from its BatchNorm (its output is roughly N(beta, gamma^2) over the data), so
the weakest filters are switched off first and the input-dependent part (the weights) grows from there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..bundle import Bundle, load_bundle
from ..models import DecoupledNet, create_model
from .config import TrainConfig

_NEW_PARTS = (".acm.", "path_head.")


def importance_rank(bn: nn.BatchNorm2d) -> Tensor:
    """Rank in [0, 1] (0: weakest) of each channel's expected post-ReLU output, from BN's affine parameters."""
    gamma, beta = bn.weight.detach().abs().clamp_min(1e-8), bn.bias.detach()
    z = beta / gamma
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = gamma * normal.log_prob(z).exp() + beta * normal.cdf(z)
    rank = expected.argsort().argsort().to(gamma.dtype)
    return rank / max(len(rank) - 1, 1)


def _dense_source(cfg: TrainConfig, dataset_fingerprint: str | None) -> tuple[Bundle, str]:
    """The dense bundle ``cfg.init_from``, checked against the run: dense, same architecture and data."""
    path = Path(cfg.init_from or "")
    bundle = load_bundle(path)
    meta = bundle.meta
    where = f"init_from={str(path)!r}"
    if meta["gated"]:
        raise ValueError(f"{where} is a gated bundle; decouple starts from a dense one (trained with --gated false)")
    if meta["arch"] != cfg.arch:
        raise ValueError(f"{where} is a {meta['arch']} bundle but arch={cfg.arch!r}: the architectures must match")
    arch_args = dict(meta["arch_args"])
    if cfg.head_hidden >= 0 and arch_args.get("head_hidden", cfg.head_hidden) != cfg.head_hidden:
        raise ValueError(f"{where} has head_hidden={arch_args.get('head_hidden')} but head_hidden={cfg.head_hidden}")
    fp = (meta.get("dataset") or {}).get("fingerprint")
    if dataset_fingerprint and fp and fp != dataset_fingerprint:
        raise ValueError(
            f"{where} was trained on a different dataset (fingerprint {fp[:12]}..., "
            f"this run's {dataset_fingerprint[:12]}...)"
        )
    return bundle, where


def as_teacher(model: nn.Module) -> nn.Module:
    """``model`` frozen in eval mode for the distillation term, its conv weights in channels-last layout.

    The teacher only runs forward passes, once per batch; in channels-last layout oneDNN's convolutions
    take about two thirds of the time on this project's CPUs (dense VGG-8, batch 128, one thread: 160-200 ms
    -> 120-130 ms, logits equal to 6e-6), which is most of what distillation adds to a decoupling step.
    The student stays in the default layout: its training step (forward and backward) is not faster there.
    """
    model.eval().to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def continue_dense(
    cfg: TrainConfig, dataset_fingerprint: str | None = None
) -> tuple[nn.Module, dict, nn.Module | None, str]:
    """A dense model that continues training from the dense bundle ``cfg.init_from`` (``gated=false``).

    This is the dense twin's control for a decoupled model: the same start and the same extra epochs,
    without gates. Returns ``(model, arch_args, teacher, digest)`` like :func:`decouple_from`; the teacher
    (a frozen copy of the start, for self-distillation) is None unless ``cfg.distill > 0``.
    """
    bundle, _ = _dense_source(cfg, dataset_fingerprint)
    teacher = as_teacher(load_bundle(Path(cfg.init_from or "")).model) if cfg.distill > 0 else None
    model = bundle.model.train()
    return model, dict(bundle.meta["arch_args"]), teacher, bundle.meta["files"]["model.safetensors"]


def decouple_from(
    cfg: TrainConfig, dataset_fingerprint: str | None = None
) -> tuple[DecoupledNet, dict, nn.Module, str]:
    """Gated model initialised from the dense bundle ``cfg.init_from``.

    Returns ``(model, arch_args, teacher, teacher_digest)``; the teacher is the dense model in eval mode
    and the digest the SHA-256 of its weights (a resumed run checks it is still the same teacher).
    Raises ValueError (BundleError) naming what does not fit.
    """
    bundle, where = _dense_source(cfg, dataset_fingerprint)
    arch_args = dict(bundle.meta["arch_args"])
    if cfg.gate.init_bias <= 0:
        raise ValueError(f"gate.init_bias={cfg.gate.init_bias} must be > 0 when decoupling: every gate starts on")
    model = create_model(cfg.arch, gated=True, gate=cfg.gate, **arch_args)
    result = model.load_state_dict(bundle.model.state_dict(), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{where} holds weights the gated {cfg.arch} has no place for: {result.unexpected_keys[:5]}")
    unfilled = [k for k in result.missing_keys if not any(part in k or k.startswith(part) for part in _NEW_PARTS)]
    if unfilled:
        raise ValueError(f"{where} lacks weights of the gated {cfg.arch}: {unfilled[:5]}")
    with torch.no_grad():
        for _, layer in model.gated_layers():
            layer.acm.fc2.weight.zero_()
            layer.acm.fc2.bias.copy_(cfg.gate.init_bias * (0.5 + importance_rank(layer.bn)))
    return model, arch_args, as_teacher(bundle.model), bundle.meta["files"]["model.safetensors"]
