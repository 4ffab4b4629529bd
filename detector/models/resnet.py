"""CIFAR-style ResNet family (He et al. 2016, section 4.2) with gates on the convs inside blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import DecoupledNet
from .gates import GateConfig, GatedConv, LayerPath
from .registry import register_model


class BasicBlock(nn.Module):
    """``relu(g2 * bn2(conv2(g1 * relu(bn1(conv1(x))))) + shortcut(x))``.

    Both convs are gated; the shortcut (identity, or a 1x1 projection when the shape changes) is not,
    so the residual stream is never switched off.
    """

    def __init__(self, cin: int, cout: int, stride: int, gate: GateConfig | None) -> None:
        super().__init__()
        self.conv1 = GatedConv(cin, cout, stride=stride, gate=gate)
        self.conv2 = GatedConv(cout, cout, activation=False, gate=gate)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor, path: list[LayerPath] | None, name: str) -> Tensor:
        h, g1 = self.conv1(x, path=path, name=f"{name}.conv1")
        y, _ = self.conv2(h, in_active=None if g1 is None else g1.sum(1), path=path, name=f"{name}.conv2")
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(DecoupledNet):
    """Stem conv (16 filters), three stages of ``depth`` basic blocks (16, 32, 64), GAP, Linear."""

    def __init__(
        self,
        depth: int,
        *,
        widths: Sequence[int] = (16, 32, 64),
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        gate: GateConfig | None = None,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2470, 0.2435, 0.2616),
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, input_size=input_size, mean=mean, std=std)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        size = input_size
        self._static = in_channels * widths[0] * 9 * size * size
        blocks, cin = [], widths[0]
        for s, w in enumerate(widths):
            for b in range(depth):
                stride = 2 if (s > 0 and b == 0) else 1
                size = (size + stride - 1) // stride
                block = BasicBlock(cin, w, stride, gate)
                if block.shortcut is not None:
                    self._static += cin * w * size * size
                blocks.append(block)
                cin = w
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(cin, num_classes)
        self._static += cin * num_classes
        self._names = [f"stage{1 + i // depth}.block{i % depth}" for i in range(len(blocks))]
        self._finish_init()

    def _forward(self, x: Tensor, path: list[LayerPath] | None) -> tuple[Tensor, Tensor]:
        x = self.stem(x)
        for name, block in zip(self._names, self.blocks):
            x = block(x, path, name)
        h = x.mean(dim=(2, 3))
        return self.classifier(h), h

    def static_macs(self) -> int:
        return self._static


@register_model
def resnet20(**kwargs) -> ResNet:
    """ResNet-20 for 32x32 RGB images: 3 blocks per stage, 18 gated convs."""
    return ResNet(3, **kwargs)


@register_model
def resnet56(**kwargs) -> ResNet:
    """ResNet-56 for 32x32 RGB images: 9 blocks per stage, 54 gated convs."""
    return ResNet(9, **kwargs)
