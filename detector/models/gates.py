"""The architecture controlling module (ACM) and the gated convolution it drives.

METHOD.md section 1: a small module looks at the feature map entering a conv layer and decides, per
input, which of the layer's filters run. The decision vector is the layer's *architecture encoding*;
over all layers it is the input's *calculation path*.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# A filter is on when its soft gate p exceeds this (METHOD.md section 1); prototypes and the engine use it too.
GATE_THRESHOLD = 0.5


@dataclass(frozen=True)
class GateConfig:
    """How every controlling module of a model is built and how its gates are sampled.

    Parameters
    ----------
    reduction : hidden width of the encoder is ``max(out_channels // reduction, min_hidden)``.
    min_hidden : lower bound on that width, so that thin layers still get a usable encoder.
    init_bias : starting bias of the last Linear; positive means every filter starts switched on,
        so a fresh gated net trains like its dense twin before sparsity bites (sigmoid(3) = 0.95).
    temperature : ``p = sigmoid(z / temperature)``.
    noise : ``"none"`` or ``"logistic"``: logistic noise added to the logits while training, which
        makes the hard gate a sample of a Bernoulli(p) (the binary Gumbel trick).
    noise_scale : multiplier of that noise.
    """

    reduction: int = 4
    min_hidden: int = 8
    init_bias: float = 3.0
    temperature: float = 1.0
    noise: str = "none"
    noise_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"reduction={self.reduction} must be >= 1")
        if self.min_hidden < 1:
            raise ValueError(f"min_hidden={self.min_hidden} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.noise not in ("none", "logistic"):
            raise ValueError(f"noise={self.noise!r} must be 'none' or 'logistic'")


class ControllingModule(nn.Module):
    """GAP -> Linear -> ReLU -> Linear: gate logits for each output filter of one layer.

    ``forward(x)`` returns ``(p, g)``: the soft gate ``p = sigmoid(z / T)`` and the hard gate
    ``g = 1[p > 0.5]``. While training, ``g`` carries a straight-through gradient: its value is
    the hard gate, its gradient is that of ``p``.
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: GateConfig) -> None:
        super().__init__()
        hidden = max(out_channels // cfg.reduction, cfg.min_hidden)
        self.cfg = cfg
        self.straight_through = False  # see straight_through(): STE gradients in eval mode too
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        nn.init.constant_(self.fc2.bias, cfg.init_bias)

    def logits(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.logits(x)
        p = torch.sigmoid(z / self.cfg.temperature)
        if not self.training:
            hard = (p > GATE_THRESHOLD).to(p.dtype)
            return p, (hard + (p - p.detach())) if self.straight_through else hard
        decide = p
        if self.cfg.noise == "logistic":
            u = torch.rand_like(z).clamp_(1e-6, 1 - 1e-6)
            noisy = z + self.cfg.noise_scale * (torch.log(u) - torch.log1p(-u))
            decide = torch.sigmoid(noisy / self.cfg.temperature)
        hard = (decide > GATE_THRESHOLD).to(p.dtype)
        return p, hard + (decide - decide.detach())  # exact hard values, gradient of decide

    def macs(self) -> int:
        """Multiply-accumulates of the encoder's two Linear layers for one input."""
        return self.fc1.in_features * self.fc1.out_features + self.fc2.in_features * self.fc2.out_features


@dataclass
class LayerPath:
    """What one gated layer did for a batch of N inputs.

    Attributes
    ----------
    name : the layer's name, e.g. ``"features.3"`` or ``"stage2.block1.conv2"``.
    soft : Tensor (N, C) in [0, 1], the soft gate p.
    hard : Tensor (N, C) in {0, 1}, the hard gate g (the architecture encoding).
    encoding : Tensor (N, C) in [0, 1], the pre-gate response GAP(|act(bn(conv(x)))|),
        divided per input by its maximum over filters.
    pooled : Tensor (N, C), global-average-pooled output of the layer after gating.
    macs : Tensor (N,), multiply-accumulates this layer executed per input (conv on active
        input and output channels, plus the controlling module). Its value counts hard gates; while
        training it carries their straight-through gradient, so a loss on executed FLOPs can be
        minimised directly (``TrainConfig.target_flops``).
    dense_macs : int, what the same conv costs in the dense twin.
    """

    name: str
    soft: Tensor
    hard: Tensor
    encoding: Tensor
    pooled: Tensor
    macs: Tensor
    dense_macs: int


class GateAndPool(torch.autograd.Function):
    """``(a * g[:, :, None, None], a.mean((2, 3)))`` in one autograd node, for a (N, C, H, W) and g (N, C).

    The gated output and the pooled response (the alignment encoding) both read ``a``; as two autograd
    nodes their backward passes write two full-size gradients of ``a`` (a multiply, and an expand plus a
    divide by H*W) and add them. Here the gradient of ``a`` is one multiply with an in-place broadcast
    add, and the gradient of ``g`` (the straight-through path) one multiply-and-sum, which keeps the
    gated training step closer to the dense one's cost (``bench/train_bench.py``).
    """

    @staticmethod
    def forward(ctx, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.save_for_backward(a, g)
        ctx.set_materialize_grads(False)  # an output no loss reads passes None: no full-size zeros
        return a * g[:, :, None, None], a.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_mean: Tensor | None):  # type: ignore[override]
        a, g = ctx.saved_tensors
        n, c, h, w = a.shape
        grad_a = grad_g = None
        if grad_y is None and grad_mean is None:
            return None, None
        if ctx.needs_input_grad[0]:
            if grad_y is None:
                grad_a = (grad_mean / (h * w))[:, :, None, None].expand_as(a).contiguous()
            else:
                grad_a = grad_y * g[:, :, None, None]
                if grad_mean is not None:
                    grad_a += (grad_mean / (h * w))[:, :, None, None]
        if ctx.needs_input_grad[1] and grad_y is not None:
            grad_g = (grad_y * a).sum(dim=(2, 3))
        return grad_a, grad_g


class GatedConv(nn.Module):
    """``y = g * act(bn(conv(x)))`` with g from a controlling module on x (METHOD.md section 1).

    With ``gate=None`` it is the plain conv-bn-act of the dense twin. ``activation=False`` leaves
    out the ReLU (the second conv of a residual block, whose ReLU follows the addition).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        activation: bool = True,
        gate: GateConfig | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.activation = activation
        self.acm = ControllingModule(in_channels, out_channels, gate) if gate is not None else None

    @property
    def gated(self) -> bool:
        return self.acm is not None

    def forward(
        self,
        x: Tensor,
        *,
        in_active: Tensor | None = None,
        path: list[LayerPath] | None = None,
        name: str = "",
    ) -> tuple[Tensor, Tensor | None]:
        """Return ``(y, g)``; g is None for a dense layer.

        in_active : Tensor (N,) or None, how many input channels are nonzero for each input (None:
            all of them). Only used to count executed MACs (its gradient, if any, flows into them).
        path : when given, a :class:`LayerPath` is appended to it.
        """
        a = self.bn(self.conv(x))
        if self.activation:
            a = F.relu(a)
        if self.acm is None:
            if path is not None:
                n = x.shape[0]
                dense = self.conv_macs(a.shape[-2:])
                full = torch.full((n, a.shape[1]), 1.0, device=a.device)
                mean = a.mean(dim=(2, 3))
                path.append(
                    LayerPath(
                        name,
                        full,
                        full,
                        self._encode(a, mean),
                        mean,
                        torch.full((n,), float(dense), device=a.device),
                        dense,
                    )
                )
            return a, None
        p, g = self.acm(x)
        if path is None:
            return a * g[:, :, None, None], g
        y, mean = GateAndPool.apply(a, g)
        out_active = g.sum(1)  # straight-through gradient while training (FLOPs target)
        cin = self.conv.in_channels
        active_in = torch.full_like(out_active, float(cin)) if in_active is None else in_active.to(out_active)
        per_pair = self.conv.kernel_size[0] * self.conv.kernel_size[1] * a.shape[-2] * a.shape[-1]
        macs = active_in * out_active * per_pair + self.acm.macs()
        # GAP is linear and g is constant per channel, so GAP(y) = g * GAP(a): no second pass over y.
        path.append(LayerPath(name, p, g, self._encode(a, mean), g * mean, macs, self.conv_macs(a.shape[-2:])))
        return y, g

    def _encode(self, a: Tensor, mean: Tensor) -> Tensor:
        """GAP(|a|) divided per input by its maximum over filters: the layer's own encoding in [0, 1].

        After a ReLU, |a| = a and GAP(|a|) is the mean already computed.
        """
        e = mean if self.activation else a.abs().mean(dim=(2, 3))
        return e / e.amax(dim=1, keepdim=True).clamp_min(1e-8)

    def conv_macs(self, out_hw: tuple[int, int] | torch.Size) -> int:
        k = self.conv.kernel_size[0] * self.conv.kernel_size[1]
        return self.conv.in_channels * self.conv.out_channels * k * int(out_hw[0]) * int(out_hw[1])


@contextmanager
def straight_through(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, hard gates pass gradients straight through to p even in eval mode.

    Forward values are unchanged (still the hard gates); only the backward pass differs. This is what
    an adaptive attacker uses to differentiate through the gates (Tramer et al. 2020, BPDA).
    """
    acms = [m for m in model.modules() if isinstance(m, ControllingModule)]
    before = [a.straight_through for a in acms]
    for a in acms:
        a.straight_through = True
    try:
        yield model
    finally:
        for a, b in zip(acms, before):
            a.straight_through = b
