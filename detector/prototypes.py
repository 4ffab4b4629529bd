"""Class prototype paths: how often each filter is on for the inputs of each class.

Computed on training images the model classifies correctly, grouped by their true class. They are the
reference the detector's distance features measure against (METHOD.md 3.3) and the per-class filter
usage that interpretation draws (METHOD.md 3.1). Stored in a bundle as the ``prototypes`` part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .data import ImageDataset
from .models import GATE_THRESHOLD, DecoupledNet


@dataclass
class Prototypes:
    """Per-class path statistics.

    Attributes
    ----------
    frequency : Tensor (K, G) in [0, 1], fraction of class-k inputs for which each filter is on.
    soft_mean : Tensor (K, G), mean soft gate p over the class's inputs.
    counts : Tensor (K,), how many images each class's statistics come from.
    layer_sizes : filters per gated layer (they sum to G).
    layer_names : names of the gated layers.
    input_size : C * H * W when the path features carry the input itself (the ``input`` group of
        :mod:`detector.features`, read by the input-consistency detector), else 0 (prototypes saved before it).
    """

    frequency: Tensor
    soft_mean: Tensor
    counts: Tensor
    layer_sizes: list[int]
    layer_names: list[str]
    input_size: int = 0
    _by_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """What the distance features read, precomputed once per device: prototype paths, clamped log
        frequencies, and the (G, L) matrix saying which layer each gate belongs to."""
        key = str(device)
        if key not in self._by_device:
            freq = self.frequency.clamp(0.01, 0.99)
            member = torch.zeros(sum(self.layer_sizes), len(self.layer_sizes))
            for i, sl in enumerate(self.layer_slices()):
                member[sl, i] = 1.0
            t = {
                "hard": self.hard,
                "soft_mean": self.soft_mean,
                "log_freq": freq.log(),
                "log_1m_freq": (1 - freq).log(),
                "member": member,
                "size": member.sum(0),
            }
            self._by_device[key] = {k: v.to(device) for k, v in t.items()}
        return self._by_device[key]

    @property
    def hard(self) -> Tensor:
        """Tensor (K, G) in {0, 1}: the prototype path of each class (filters on for most inputs)."""
        return (self.frequency > GATE_THRESHOLD).float()

    def layer_slices(self) -> list[slice]:
        bounds = torch.tensor([0, *self.layer_sizes]).cumsum(0).tolist()
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        return (
            {"frequency": self.frequency, "soft_mean": self.soft_mean, "counts": self.counts},
            {"layer_sizes": self.layer_sizes, "layer_names": self.layer_names, "input_size": self.input_size},
        )

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], info: dict) -> Prototypes:
        p = cls(
            tensors["frequency"].float(),
            tensors["soft_mean"].float(),
            tensors["counts"],
            list(info["layer_sizes"]),
            list(info["layer_names"]),
            int(info.get("input_size", 0)),
        )
        if p.input_size < 0:
            raise ValueError(f"prototypes' input_size={p.input_size} must be >= 0")
        if p.frequency.shape[1] != sum(p.layer_sizes):
            raise ValueError(f"prototypes have {p.frequency.shape[1]} gates but layers sum to {sum(p.layer_sizes)}")
        return p


@torch.no_grad()
def compute_prototypes(
    model: DecoupledNet,
    data: ImageDataset,
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    with_input: bool = True,
) -> Prototypes:
    """Prototypes from the images of ``data`` that ``model`` classifies correctly; ``with_input``: the path
    features computed against them carry the input image too (``input_size``)."""
    if not model.gated:
        raise ValueError("prototypes need a gated model; the dense twin has no calculation path")
    model.eval()
    k, g = model.num_classes, sum(model.gate_sizes)
    freq, soft, counts = torch.zeros(k, g), torch.zeros(k, g), torch.zeros(k)
    for start in range(0, len(data), batch_size):
        x = data.float_images(slice(start, start + batch_size)).to(device)
        y = data.labels[start : start + batch_size]
        out = model.forward_path(x)
        ok = out.logits.argmax(1).cpu() == y
        onehot = torch.nn.functional.one_hot(y[ok], k).float()
        freq += onehot.T @ out.hard_path.cpu()[ok]
        soft += onehot.T @ out.soft_path.cpu()[ok]
        counts += onehot.sum(0)
    if (counts == 0).any():
        missing = [i for i in range(k) if counts[i] == 0]
        raise ValueError(f"no correctly classified training images of classes {missing}")
    input_size = int(x[0].numel()) if with_input else 0  # x: the last batch's images
    return Prototypes(
        freq / counts[:, None], soft / counts[:, None], counts, model.gate_sizes, model.layer_names, input_size
    )
