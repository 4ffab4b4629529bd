"""Noisy clean images: the negatives that look perturbed without being attacks (Ma et al.'s LID recipe)."""

from __future__ import annotations


def noisy_like(clean, adversarial, seed: int):
    """Clean images plus Gaussian noise of the same per-image L2 norm as ``adversarial - clean``, in [0, 1]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(clean.shape, generator=gen)
    target = (adversarial - clean).flatten(1).norm(dim=1)
    noise = noise * (target / noise.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *[1] * (clean.ndim - 1))
    return (clean + noise).clamp(0, 1)
