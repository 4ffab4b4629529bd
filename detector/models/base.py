"""The part every decoupled network shares: normalisation, the path API and the path head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .gates import GatedConv, LayerPath
from .path import PathOutput


class DecoupledNet(nn.Module):
    """Base of every model: maps (N, C, H, W) images in [0, 1] to logits.

    Subclasses build their layers and implement :meth:`_forward` on normalised input. The
    normalisation lives in the model, so attacks and callers work in [0, 1] pixel space.

    ``path_head`` (gated models only) is the auxiliary classifier q(y | path) of the variational
    mutual-information term (METHOD.md section 2); it reads the concatenated path.
    """

    def __init__(
        self, *, num_classes: int, in_channels: int, input_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean={list(mean)} and std={list(std)} must have in_channels={in_channels} entries")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.path_head: nn.Linear | None = None

    # -- subclasses -------------------------------------------------------------------------
    def _forward(self, x: Tensor, path: list[LayerPath] | None) -> tuple[Tensor, Tensor]:
        """Return ``(logits, penultimate)`` for normalised input, appending to ``path``."""
        raise NotImplementedError

    def static_macs(self) -> int:
        """MACs of the parts no gate controls (stem, shortcuts, classifier head), per input."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def _finish_init(self) -> None:
        if self.gated:
            self.path_head = nn.Linear(sum(self.gate_sizes), self.num_classes)

    def gated_layers(self) -> list[tuple[str, GatedConv]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, GatedConv)]

    @property
    def gated(self) -> bool:
        return any(m.gated for _, m in self.gated_layers())

    @property
    def gate_sizes(self) -> list[int]:
        return [m.conv.out_channels for _, m in self.gated_layers()]

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.gated_layers()]

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(self.normalize(x), None)[0]

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, penultimate)`` without the path: what a teacher gives the distillation terms."""
        return self._forward(self.normalize(x), None)

    def forward_path(self, x: Tensor) -> PathOutput:
        """Logits plus the calculation path of each input (see :class:`PathOutput`)."""
        layers: list[LayerPath] = []
        logits, penultimate = self._forward(self.normalize(x), layers)
        static = self.static_macs()
        macs = sum((layer.macs for layer in layers), torch.zeros_like(logits[:, 0])) + static
        dense = static + sum(layer.dense_macs for layer in layers)
        return PathOutput(logits, layers, penultimate, macs, dense)

    def path_logits(self, path: Tensor) -> Tensor:
        """q(y | path): the auxiliary head's logits for a (N, sum C_l) path."""
        if self.path_head is None:
            raise RuntimeError("the dense twin has no path head")
        return self.path_head(path)
