"""The record of one forward pass: logits plus the calculation path of every input."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .gates import LayerPath


@dataclass
class PathOutput:
    """Logits and calculation paths of a batch of N inputs.

    Attributes
    ----------
    logits : Tensor (N, K).
    layers : one :class:`LayerPath` per gated layer, in execution order.
    penultimate : Tensor (N, D), the last hidden features before the classifier.
    macs : Tensor (N,), multiply-accumulates executed per input: gated convs on their active
        channels, the controlling modules, and the ungated parts (stem, shortcuts, head).
    dense_macs : int, what the dense twin of this network executes per input.
    """

    logits: Tensor
    layers: list[LayerPath]
    penultimate: Tensor
    macs: Tensor
    dense_macs: int

    @property
    def soft_path(self) -> Tensor:
        """Tensor (N, sum C_l): the soft gates of all layers, concatenated."""
        return torch.cat([layer.soft for layer in self.layers], dim=1)

    @property
    def hard_path(self) -> Tensor:
        """Tensor (N, sum C_l) in {0, 1}: the calculation path."""
        return torch.cat([layer.hard for layer in self.layers], dim=1)

    @property
    def density(self) -> Tensor:
        """Tensor (N, L): fraction of active filters in each gated layer."""
        return torch.stack([layer.hard.mean(dim=1) for layer in self.layers], dim=1)

    @property
    def flops_ratio(self) -> Tensor:
        """Tensor (N,): executed MACs relative to the dense twin."""
        return self.macs / float(self.dense_macs)
