"""VGG family: stacks of gated 3x3 convs, max-pool after each stage, a small MLP head."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import DecoupledNet
from .gates import GateConfig, GatedConv, LayerPath
from .registry import register_model


class VGG(DecoupledNet):
    """Convs ``stages[s][i]`` wide, a 2x2 max-pool after every stage, then the classifier.

    The head flattens the last feature map; with ``head_hidden > 0`` it is
    Linear -> ReLU -> Linear and the hidden layer is the penultimate feature, otherwise one Linear
    on the flattened map.
    """

    def __init__(
        self,
        stages: Sequence[Sequence[int]],
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        head_hidden: int = 256,
        gate: GateConfig | None = None,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, input_size=input_size, mean=mean, std=std)
        layers, cin, size = [], in_channels, input_size
        self.stage_ends: list[int] = []
        for widths in stages:
            for w in widths:
                layers.append(GatedConv(cin, w, gate=gate))
                cin = w
            self.stage_ends.append(len(layers) - 1)
            size //= 2
        if size < 1:
            raise ValueError(f"input_size={input_size} is too small for {len(stages)} pooling stages")
        self.features = nn.ModuleList(layers)
        flat = cin * size * size
        self.hidden = nn.Linear(flat, head_hidden) if head_hidden > 0 else None
        self.classifier = nn.Linear(head_hidden if head_hidden > 0 else flat, num_classes)
        self._flat = flat
        self._finish_init()

    def _forward(self, x: Tensor, path: list[LayerPath] | None) -> tuple[Tensor, Tensor]:
        in_active = None
        for i, layer in enumerate(self.features):
            x, g = layer(x, in_active=in_active, path=path, name=f"features.{i}")
            in_active = None if g is None else g.sum(1)
            if i in self.stage_ends:
                x = F.max_pool2d(x, 2)
        h = x.flatten(1)
        if self.hidden is not None:
            h = F.relu(self.hidden(h))
        return self.classifier(h), h

    def static_macs(self) -> int:
        head = self.classifier.in_features * self.classifier.out_features
        if self.hidden is not None:
            head += self.hidden.in_features * self.hidden.out_features
        return head


@register_model
def vgg8(**kwargs) -> VGG:
    """Six convs (32, 32, 64, 64, 128, 128) for 28x28 grey images, e.g. Fashion-MNIST."""
    return VGG(((32, 32), (64, 64), (128, 128)), **kwargs)


@register_model
def vgg16(**kwargs) -> VGG:
    """CIFAR-style VGG-16: thirteen convs, 32x32 RGB input."""
    kwargs = {
        "in_channels": 3,
        "input_size": 32,
        "head_hidden": 512,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        **kwargs,
    }
    return VGG(((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)), **kwargs)
