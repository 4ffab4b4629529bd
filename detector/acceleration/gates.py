"""Give an untrained gated model realistic, input-dependent gates (for tests and benchmarks).

A freshly initialised model has every gate on (the controlling modules start with a positive bias).
To time or test the skipping engine before a trained model exists, :func:`set_gate_densities` rescales
each controlling module's last layer so its logits vary by about one unit across inputs, then sets its
bias so that each filter is on for a chosen fraction of the given images. Per-filter fractions are drawn
around a per-layer density, so paths differ from input to input as in a trained model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..models import ControllingModule, DecoupledNet, GatedConv


def _density_range(density: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(density, (int, float)):
        lo = hi = float(density)
    else:
        lo, hi = (float(v) for v in density)
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"density={density} must be a fraction or a (low, high) range within [0, 1]")
    return lo, hi


def _calibrate(acm: ControllingModule, x: Tensor, d: float, concentration: float, rng: np.random.Generator) -> None:
    """Scale ``acm``'s last Linear so its logits on ``x`` have unit spread per filter, and set its bias so that
    each filter is on for a fraction of ``x`` drawn from Beta(d * concentration, (1 - d) * concentration)."""
    z = acm.logits(x) - acm.fc2.bias  # (N, C) logits without the bias
    scale = z.std(0).clamp_min(1e-6)
    acm.fc2.weight.div_(scale[:, None])
    z = z / scale
    c = acm.fc2.out_features
    per_filter = (
        torch.from_numpy(rng.beta(d * concentration, (1 - d) * concentration, c)).float()
        if 0 < d < 1
        else torch.full((c,), d)
    )
    # filter j is on when z_j + b_j > 0: b_j = minus the (1 - f_j) quantile of z_j over the images
    bias = -torch.quantile(z, 1 - per_filter, dim=0).diagonal()
    # the extremes: a filter meant always off (on) sits clearly below (above) every input
    bias = torch.where(per_filter <= 0, -(z.amax(0) + 1), bias)
    bias = torch.where(per_filter >= 1, -(z.amin(0) - 1), bias)
    acm.fc2.bias.copy_(bias)


@torch.no_grad()
def set_gate_densities(
    model: DecoupledNet,
    images: Tensor,
    density: float | Sequence[float] = (0.3, 0.6),
    *,
    concentration: float = 2.0,
    seed: int = 0,
) -> list[float]:
    """Set the controlling modules' last Linear so each layer's gates are on for about ``density`` of inputs.

    Parameters
    ----------
    model : a gated DecoupledNet; changed in place and left in eval mode.
    images : Tensor (N, C, H, W) in [0, 1], the inputs the densities are set on (N >= 20 advised).
    density : one target fraction for every layer, or a (low, high) range each layer's target is drawn
        from uniformly.
    concentration : per-filter fractions are Beta(d * c, (1 - d) * c) around the layer's target d; small
        c gives many always-on and always-off filters, large c gives every filter about d.
    seed : seeds the draws.

    Returns
    -------
    The target density of each gated layer.
    """
    if not model.gated:
        raise ValueError("set_gate_densities needs a gated model")
    lo, hi = _density_range(density)
    rng = np.random.default_rng(seed)
    model.eval()
    targets: list[float] = []

    def calibrate(acm: ControllingModule, args: tuple[Tensor, ...]) -> None:
        # runs just before the module, on the input it gets with every earlier layer already set
        d = float(rng.uniform(lo, hi))
        targets.append(d)
        _calibrate(acm, args[0], d, concentration, rng)

    handles = [layer.acm.register_forward_pre_hook(calibrate) for _, layer in model.gated_layers()]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return targets


@torch.no_grad()
def force_gates(layer: GatedConv, on: Sequence[bool] | Tensor) -> None:
    """Make a layer's gates constant: filter j on for every input iff ``on[j]`` (zero weights, bias +-10)."""
    on = torch.as_tensor(on, dtype=torch.bool)
    if on.shape != (layer.acm.fc2.out_features,):
        raise ValueError(f"on has shape {tuple(on.shape)}, the layer has {layer.acm.fc2.out_features} filters")
    layer.acm.fc2.weight.zero_()
    layer.acm.fc2.bias.copy_(torch.where(on, 10.0, -10.0))
