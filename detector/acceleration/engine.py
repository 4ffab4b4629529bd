"""An inference engine that runs only the filters whose gate is on (METHOD.md section 3.2).

The masked model computes every filter and multiplies the switched-off ones by zero. This engine
computes the gates exactly as the model does (the controlling modules need the layer's input), then
convolves only the output filters whose gate is on, reading only the input channels the previous layer
left on (the others are exactly zero, so leaving them out of the sum changes nothing but rounding).

Feature maps travel between layers *compact*: only the active channels are stored, with the list of
which channels they are (:class:`Compact`). A controlling module reads the compact map directly (the
global average of an off channel is exactly zero, so its column of the first Linear is simply left out),
and a full map is only rebuilt where the network needs one (the classifier head, a residual addition).
Every small tensor operation costs microseconds of dispatch on a CPU, so the engine keeps their number
per layer low; see bench/accel_bench.py for what that buys.

BatchNorm is folded into the convolution weights when the engine is built, from its running statistics
(eval semantics). The engine is a snapshot: change the model's weights and build it again.

Batch 1 (the latency case) runs a straight-line path, :meth:`EngineConv.single`: per layer the gates,
one ``nonzero``, the weights sliced to the image's active output and input channels, one conv. With several
images the active sets differ per image, and each gated layer runs one of:

``union``   slice to the channels active for *any* image of the batch, run one ordinary conv, then multiply
            by the gates. Cheap bookkeeping; saves only what the whole batch leaves off.
``gather``  gather each image's own channels (padded to the batch's largest count with a zero filter) and
            run one grouped conv with one group per image. Saves each image's FLOPs, but grouped convs run
            at a lower FLOP rate than one large conv.

``batch_mode="auto"`` (default) picks per layer and batch the lower estimated cost,
``|union_in| * |union_out|`` against ``gather_penalty * max_in * max_out``; once a layer has gone per-image,
the layers after it stay per-image. Grouping the batch by identical
gate pattern is not offered: nearly every image of a batch has its own pattern in every layer
(bench/accel_bench.py counts them), so the groups are singletons and it degenerates into a loop of batch-1
calls.

Architectures. The layer-level work (:class:`EngineConv`) is shared; how layers are wired is one short
executor per model family (:data:`EXECUTORS`: VGG, ResNet), mirroring the model's own ``_forward``. A new
family needs its executor registered with :func:`register_executor`; the tests run the equivalence checks
over every registered model, so a missing one fails loudly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import GATE_THRESHOLD, DecoupledNet, GatedConv, LayerPath, PathOutput
from ..models.resnet import ResNet
from ..models.vgg import VGG

BATCH_MODES = ("auto", "union", "gather")


@dataclass(frozen=True)
class EngineConfig:
    """How :class:`SkippingEngine` runs batches of more than one image.

    Parameters
    ----------
    batch_mode : ``"auto"``, ``"union"`` or ``"gather"`` (see the module docstring). Batch 1 always
        slices the weights to the image's own channels.
    gather_penalty : how many times more a FLOP costs in the grouped per-image conv than in one ordinary
        conv; ``auto`` uses it to choose. 1.5: on vgg8 at batch 32 on one CPU thread, grouped convs ran at
        about half the FLOP rate of ordinary ones, but the union's extra work (channels some images have off,
        the gate multiply) made all-gather the fastest choice already from 1.5 down.
    """

    batch_mode: str = "auto"
    gather_penalty: float = 1.5

    def __post_init__(self) -> None:
        if self.batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode={self.batch_mode!r} must be one of {BATCH_MODES}")
        if self.gather_penalty <= 0:
            raise ValueError(f"gather_penalty={self.gather_penalty} must be > 0")


def fold_batchnorm(weight: Tensor, bn: nn.BatchNorm2d, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weight (C_out, C_in, k, k) and bias (C_out,) of ``bn(conv(x))`` as one conv, from running statistics."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bias is not None:
        shift = shift + bias.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    w = weight.double() * scale[:, None, None, None]
    return w.to(weight.dtype).contiguous(), shift.to(weight.dtype).contiguous()


def fold_sequential(seq: nn.Sequential) -> nn.Sequential:
    """A copy of ``seq`` with each Conv2d directly followed by a BatchNorm2d merged into one biased conv."""
    mods: list[nn.Module] = []
    items = list(seq)
    i = 0
    while i < len(items):
        m = items[i]
        if isinstance(m, nn.Conv2d) and i + 1 < len(items) and isinstance(items[i + 1], nn.BatchNorm2d):
            w, b = fold_batchnorm(m.weight.detach(), items[i + 1], None if m.bias is None else m.bias.detach())
            conv = nn.Conv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                stride=m.stride,
                padding=m.padding,
                dilation=m.dilation,
                groups=m.groups,
                bias=True,
            ).to(device=w.device, dtype=w.dtype)
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
            mods.append(conv)
            i += 2
            continue
        if isinstance(m, nn.BatchNorm2d):
            raise NotImplementedError("a BatchNorm2d that does not follow a Conv2d cannot be folded")
        mods.append(copy.deepcopy(m))
        i += 1
    return nn.Sequential(*mods).eval().requires_grad_(False)


@dataclass
class Compact:
    """A feature map (N, C, H, W) stored as its active channels only.

    Attributes
    ----------
    values : Tensor (N, M, H, W).
    chan : which channel each of the M is. None: all C in order (M = C). Tensor (M,): the same channels
        for every image. Tensor (N, M): per image; padding entries hold some channel and all-zero values.
    channels : C.
    live : Tensor (N, M) bool, which of the M are active for each image (None: all of them). A channel can
        be in a shared ``chan`` yet off for one image; its values are then zero.
    """

    values: Tensor
    chan: Tensor | None
    channels: int
    live: Tensor | None = None

    def full(self) -> Tensor:
        """The (N, C, H, W) map, zeros in the channels not stored."""
        if self.chan is None:
            return self.values
        n, _, h, w = self.values.shape
        out = self.values.new_zeros(n, self.channels, h, w)
        if self.chan.ndim == 1:
            return out.index_copy_(1, self.chan, self.values)
        # padding entries carry zeros, so adding them to any channel is harmless
        return out.scatter_add_(1, self.chan[:, :, None, None].expand_as(self.values), self.values)

    def spread(self, v: Tensor) -> Tensor:
        """Per-channel values (N, M) to (N, C), zeros elsewhere."""
        if self.chan is None:
            return v
        out = v.new_zeros(v.shape[0], self.channels)
        if self.chan.ndim == 1:
            return out.index_copy_(1, self.chan, v)
        return out.scatter_add_(1, self.chan, v)

    def add_to(self, x: Tensor) -> Tensor:
        """``x + self.full()`` written into ``x`` (N, C, H, W)."""
        if self.chan is None:
            return x.add_(self.values)
        if self.chan.ndim == 1:
            return x.index_add_(1, self.chan, self.values)
        return x.scatter_add_(1, self.chan[:, :, None, None].expand_as(self.values), self.values)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Compact:
        """Apply a per-channel operation (pooling) to the stored channels."""
        return Compact(fn(self.values), self.chan, self.channels, self.live)

    def _used(self) -> Tensor:
        """(C,) bool: channels some image has on (per-image ``chan`` only)."""
        used = torch.zeros(self.channels + 1, dtype=torch.bool, device=self.values.device)
        used[self.chan if self.live is None else self.chan.masked_fill(~self.live, self.channels)] = True
        return used[:-1]

    def shared(self) -> Compact:
        """The same map with one channel list for the whole batch (the union over images)."""
        if self.chan is None or self.chan.ndim == 1:
            return self
        chan = self._used().nonzero().squeeze(1)
        live = self.live if self.live is not None else torch.ones_like(self.chan, dtype=torch.bool)
        # which of the shared channels each image has on, through the dense (N, C) form of its own list
        on = self.spread(live.to(self.values.dtype)).index_select(1, chan) > 0
        return Compact(self.full().index_select(1, chan), chan, self.channels, None if bool(on.all()) else on)


def _padded_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(N, M) positions of each row's True entries (M = largest count), and the padding mask (N, M).

    Padding positions hold positions of False entries.
    """
    counts = mask.sum(1)
    m = int(counts.max())
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :m]  # True entries first
    return order, torch.arange(m, device=mask.device)[None, :] >= counts[:, None]


class EngineConv(nn.Module):
    """One :class:`GatedConv` for inference: BN folded into the conv, only active channels computed."""

    def __init__(self, layer: GatedConv, config: EngineConfig) -> None:
        super().__init__()
        conv = layer.conv
        if conv.groups != 1 or conv.dilation != (1, 1):
            raise NotImplementedError("the engine supports plain (groups=1, dilation=1) convolutions")
        w, b = fold_batchnorm(conv.weight.detach(), layer.bn)
        self.register_buffer("weight", w)
        self.register_buffer("bias", b)
        # the same weights plus one zero filter and one zero input channel, which gather mode pads with
        w_pad = w.new_zeros(w.shape[0] + 1, w.shape[1] + 1, *w.shape[2:])
        w_pad[:-1, :-1] = w
        self.register_buffer("weight_pad", w_pad)
        self.register_buffer("bias_pad", torch.cat([b, b.new_zeros(1)]))
        self.acm = None if layer.acm is None else copy.deepcopy(layer.acm).eval().requires_grad_(False)
        self.temperature = 1.0 if layer.acm is None else float(layer.acm.cfg.temperature)
        self.activation = layer.activation
        self.stride, self.padding, self.kernel_size = conv.stride, conv.padding, conv.kernel_size
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.config = config
        self.acm_macs = 0 if self.acm is None else self.acm.macs()
        self._nan = torch.full((1, self.out_channels), float("nan"), device=w.device)
        # plain references for the batch-1 path, where attribute lookups through nn.Module add up
        self._w, self._b = w, b
        acm = self.acm
        self._w1, self._b1 = (None, None) if acm is None else (acm.fc1.weight, acm.fc1.bias)
        self._w2, self._b2 = (None, None) if acm is None else (acm.fc2.weight, acm.fc2.bias)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def _conv(self, x: Tensor, w: Tensor, b: Tensor, groups: int = 1) -> Tensor:
        """act(conv(x) + b); with no input or no output channels (conv2d refuses those) act(b) or nothing."""
        n, cin, h, wd = x.shape
        if w.shape[0] == 0 or cin == 0:  # output channel j is then just its bias
            a = b[None, :, None, None].expand(n, w.shape[0], *self._out_hw(h, wd)).contiguous()
        else:
            a = F.conv2d(x, w, b, stride=self.stride, padding=self.padding, groups=groups)
        return F.relu_(a) if self.activation else a

    def single(self, v: Tensor, chan: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """One image: the input (1, M, H, W) holds channels ``chan`` (None: all, in order).

        Returns the output (1, A, H', W') of the active filters, which filters those are (None: all), and
        the soft gates p (1, C_out) (None for an ungated layer; the hard gates are ``p > 0.5``). The same
        computation as :meth:`forward` for N = 1, written straight: at batch 1 every tensor operation's
        dispatch cost shows, so this path has as few as it can.
        """
        w, b = self._w, self._b
        if self._w1 is None:
            return self._conv(v, w if chan is None else w.index_select(1, chan), b), None, None
        # off input channels average to exactly zero: leave their columns of the first Linear out
        h = F.linear(v.mean((2, 3)), self._w1 if chan is None else self._w1.index_select(1, chan), self._b1)
        z = F.linear(h.relu_(), self._w2, self._b2)
        p = torch.sigmoid(z if self.temperature == 1.0 else z / self.temperature)
        out = (p.view(-1) > GATE_THRESHOLD).nonzero().view(-1)
        n_out = out.shape[0]
        if n_out == self.out_channels:
            out = None
        else:
            w, b = w.index_select(0, out), b.index_select(0, out)
        if chan is not None:
            w = w.index_select(1, chan)
        if n_out == 0 or v.shape[1] == 0:
            return self._conv(v, w, b), out, p
        a = F.conv2d(v, w, b, self.stride, self.padding)
        return (a.relu_() if self.activation else a), out, p

    def gates(self, x: Compact) -> tuple[Tensor, Tensor]:
        """(p, on): soft gates (N, C_out) and hard gates as bool, exactly as :class:`ControllingModule`
        computes them on the full map (``g = on.float()``)."""
        acm = self.acm
        m = x.values.mean(dim=(2, 3))
        if x.chan is None:
            h = F.linear(m, acm.fc1.weight, acm.fc1.bias)
        elif x.chan.ndim == 1:  # off channels average to exactly zero: leave their columns out
            h = F.linear(m, acm.fc1.weight.index_select(1, x.chan), acm.fc1.bias)
        else:
            h = F.linear(x.spread(m), acm.fc1.weight, acm.fc1.bias)
        z = F.linear(F.relu_(h), acm.fc2.weight, acm.fc2.bias)
        p = torch.sigmoid(z if self.temperature == 1.0 else z / self.temperature)
        return p, p > GATE_THRESHOLD

    def forward(self, x: Compact) -> tuple[Compact, Tensor | None, Tensor | None]:
        """The layer's output map, its soft gates p and hard gates as bool (N, C_out); None, None if ungated."""
        if self.acm is None:
            x = x.shared()
            w = self.weight if x.chan is None else self.weight.index_select(1, x.chan)
            return Compact(self._conv(x.values, w, self.bias), None, self.out_channels), None, None
        p, on = self.gates(x)
        n = on.shape[0]
        mode = "single" if n == 1 else self.config.batch_mode
        if mode == "auto":
            mode = self._choose(x, on)
        y = self._gather(x, on) if mode == "gather" else self._shared(x, on)
        return y, p, on

    def _choose(self, x: Compact, on: Tensor) -> str:
        if x.chan is not None and x.chan.ndim == 2:
            return "gather"  # the input is already per image: going back to a shared layout costs a scatter
        per_image_in = x.values.shape[1] if x.live is None else int(x.live.sum(1).max())
        union_out, per_image_out = torch.stack([on.any(0).sum(), on.sum(1).max()]).tolist()
        union = x.values.shape[1] * union_out
        gather = self.config.gather_penalty * per_image_in * per_image_out
        return "union" if union <= gather else "gather"

    def _shared(self, x: Compact, on: Tensor) -> Compact:
        """One conv on the channels on for any image (for one image: exactly its own)."""
        x = x.shared()
        n = on.shape[0]
        chan = (on[0] if n == 1 else on.any(0)).nonzero().squeeze(1)
        w, b = self.weight, self.bias
        if chan.shape[0] == self.out_channels:
            chan = None
        else:
            w, b = w.index_select(0, chan), b.index_select(0, chan)
        if x.chan is not None:
            w = w.index_select(1, x.chan)
        a = self._conv(x.values, w, b)
        live = None
        if n > 1:
            live = on if chan is None else on.index_select(1, chan)
            if not bool(live.all()):  # on for some images only: zero it for the others, as the model does
                a.mul_(live[:, :, None, None].to(a.dtype))
            else:
                live = None
        return Compact(a, chan, self.out_channels, live)

    def _gather(self, x: Compact, on: Tensor) -> Compact:
        """One grouped conv, each image on its own channels (padded with a zero filter / zero channel)."""
        n, m, h, wd = x.values.shape
        pad_channel = self.in_channels  # index of weight_pad's zero input channel
        if x.chan is not None and x.chan.ndim == 2:
            # the output of a gather layer: each image's channels come first, its (all-zero) padding last
            xs, m_in = x.values, m
            glob_in = x.chan if x.live is None else x.chan.masked_fill(~x.live, pad_channel)
        elif x.live is None:  # every stored channel is live for every image
            xs, m_in = x.values, m
            chan = torch.arange(m, device=on.device) if x.chan is None else x.chan
            glob_in = chan.expand(n, m)
        else:  # a shared map some of whose channels are off for some images: gather each image's own
            pos_in, pad_in = _padded_index(x.live)
            m_in = pos_in.shape[1]
            xs = torch.gather(x.values, 1, pos_in[:, :, None, None].expand(n, m_in, h, wd))
            glob_in = (pos_in if x.chan is None else x.chan[pos_in]).masked_fill(pad_in, pad_channel)
        out, pad_out = _padded_index(on)
        out_w = out.masked_fill(pad_out, self.out_channels)
        m_out = out.shape[1]
        # one row of k*k weights per (image, filter, input channel), picked with a single index_select
        flat = out_w[:, :, None] * (self.in_channels + 1) + glob_in[:, None, :]
        k = self.kernel_size
        w = self.weight_pad.view(-1, k[0] * k[1]).index_select(0, flat.view(-1)).view(n * m_out, m_in, *k)
        b = self.bias_pad.index_select(0, out_w.view(-1))
        a = self._conv(xs.reshape(1, n * m_in, h, wd), w, b, groups=n)
        return Compact(a.reshape(n, m_out, *a.shape[2:]), out, self.out_channels, ~pad_out)

    def record(self, name: str, in_active: Tensor | None, y: Compact, p: Tensor | None) -> LayerPath:
        """The :class:`LayerPath` the model's GatedConv would append; ``encoding`` is NaN (not computed).

        in_active : (N,) how many input channels are on per image (None: all), as the model counts them.
        """
        n, _, oh, ow = y.values.shape
        dense = self.in_channels * self.out_channels * self.kernel_size[0] * self.kernel_size[1] * oh * ow
        pooled = y.spread(y.values.mean(dim=(2, 3)))
        if p is None:
            full = torch.ones(n, self.out_channels, device=pooled.device)
            e = pooled if self.activation else y.spread(y.values.abs().mean(dim=(2, 3)))
            e = e / e.amax(dim=1, keepdim=True).clamp_min(1e-8)
            return LayerPath(name, full, full, e, pooled, torch.full((n,), float(dense), device=pooled.device), dense)
        g = (p > GATE_THRESHOLD).to(p.dtype)
        per_pair = self.kernel_size[0] * self.kernel_size[1] * oh * ow
        out_active = g.sum(1)
        macs = (
            out_active * float(self.in_channels * per_pair)
            if in_active is None
            else out_active.mul(in_active).mul_(float(per_pair))
        )
        macs.add_(float(self.acm_macs))
        # the pre-gate response of every filter needs the filters the engine skips
        return LayerPath(name, p, g, self._nan.expand(n, -1), pooled, macs, dense)


# -- executors: how each model family wires its layers (mirrors its _forward) ------------------------------
class _Executor(nn.Module):
    def run(self, x: Tensor, path: list[LayerPath] | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def _pool(v: Tensor) -> Tensor:
    """2x2 max-pool; also of a map with no channels left (which max_pool2d refuses)."""
    if v.shape[1] == 0:
        return v.new_zeros(v.shape[0], 0, v.shape[2] // 2, v.shape[3] // 2)
    return F.max_pool2d(v, 2)


class VGGExecutor(_Executor):
    """:class:`~detector.models.vgg.VGG`: gated convs, 2x2 max-pool at stage ends, MLP head on the full map."""

    def __init__(self, model: VGG, config: EngineConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EngineConv(layer, config) for layer in model.features)
        self.stage_ends = set(model.stage_ends)
        self.width = model.features[-1].conv.out_channels
        self.hidden = copy.deepcopy(model.hidden)
        self.classifier = copy.deepcopy(model.classifier)

    def run(self, x: Tensor, path: list[LayerPath] | None) -> tuple[Tensor, Tensor]:
        if x.shape[0] == 1:
            return self._run_single(x, path)
        c = Compact(x, None, x.shape[1])
        in_active = None
        for i, layer in enumerate(self.layers):
            y, p, _ = layer(c)
            if path is not None:
                path.append(layer.record(f"features.{i}", in_active, y, p))
                in_active = None if p is None else path[-1].hard.sum(1)
            c = y.map(_pool) if i in self.stage_ends else y
        return self._head(c)

    def _run_single(self, v: Tensor, path: list[LayerPath] | None) -> tuple[Tensor, Tensor]:
        chan, in_active, stage_ends = None, None, self.stage_ends
        for i, layer in enumerate(self.layers):
            v, out, p = layer.single(v, chan)
            if path is not None:
                path.append(layer.record(f"features.{i}", in_active, Compact(v, out, layer.out_channels), p))
                in_active = None if p is None else path[-1].hard.sum(1)
            if i in stage_ends:
                v = _pool(v)
            chan = out
        return self._head(Compact(v, chan, self.width))

    def _head(self, c: Compact) -> tuple[Tensor, Tensor]:
        first = self.hidden if self.hidden is not None else self.classifier
        if c.chan is not None and c.chan.ndim == 1:
            # the flattened map is zero in every off channel: use only the head's columns of the others
            w = first.weight.view(first.out_features, c.channels, -1).index_select(1, c.chan).flatten(1)
            h = F.linear(c.values.flatten(1), w, first.bias)
        else:
            h = first(c.full().flatten(1))
        if self.hidden is None:
            return h, c.full().flatten(1)
        h = F.relu_(h)
        return F.linear(h, self.classifier.weight, self.classifier.bias), h


class ResNetExecutor(_Executor):
    """:class:`~detector.models.resnet.ResNet`: folded stem, blocks whose gated branch is added compactly."""

    def __init__(self, model: ResNet, config: EngineConfig) -> None:
        super().__init__()
        self.stem = fold_sequential(model.stem)
        self.conv1 = nn.ModuleList(EngineConv(b.conv1, config) for b in model.blocks)
        self.conv2 = nn.ModuleList(EngineConv(b.conv2, config) for b in model.blocks)
        self.shortcuts = nn.ModuleList(
            nn.Identity() if b.shortcut is None else fold_sequential(b.shortcut) for b in model.blocks
        )
        self.identity = [b.shortcut is None for b in model.blocks]
        self.names = list(model._names)
        self.classifier = copy.deepcopy(model.classifier)

    def run(self, x: Tensor, path: list[LayerPath] | None) -> tuple[Tensor, Tensor]:
        x = self.stem(x)
        if x.shape[0] == 1:
            return self._run_single(x, path)
        for name, conv1, conv2, shortcut, identity in zip(
            self.names, self.conv1, self.conv2, self.shortcuts, self.identity
        ):
            h, p1, _ = conv1.forward(Compact(x, None, x.shape[1]))
            y, p2, _ = conv2.forward(h)
            if path is not None:
                path.append(conv1.record(f"{name}.conv1", None, h, p1))
                path.append(conv2.record(f"{name}.conv2", None if p1 is None else path[-1].hard.sum(1), y, p2))
            # the stream x is this engine's own tensor, so the identity shortcut can be added into in place
            x = F.relu_(y.add_to(x if identity else shortcut(x)))
        h = x.mean(dim=(2, 3))
        return self.classifier(h), h

    def _run_single(self, x: Tensor, path: list[LayerPath] | None) -> tuple[Tensor, Tensor]:
        for name, conv1, conv2, shortcut, identity in zip(
            self.names, self.conv1, self.conv2, self.shortcuts, self.identity
        ):
            h, out1, p1 = conv1.single(x, None)
            y, out2, p2 = conv2.single(h, out1)
            if path is not None:
                path.append(conv1.record(f"{name}.conv1", None, Compact(h, out1, conv1.out_channels), p1))
                path.append(
                    conv2.record(
                        f"{name}.conv2",
                        None if p1 is None else path[-1].hard.sum(1),
                        Compact(y, out2, conv2.out_channels),
                        p2,
                    )
                )
            x = x if identity else shortcut(x)
            x = F.relu_(x.add_(y) if out2 is None else x.index_add_(1, out2, y))
        h = x.mean(dim=(2, 3))
        return self.classifier(h), h


EXECUTORS: dict[type, Callable[[DecoupledNet, EngineConfig], _Executor]] = {VGG: VGGExecutor, ResNet: ResNetExecutor}


def register_executor(model_type: type, builder: Callable[[DecoupledNet, EngineConfig], _Executor]) -> None:
    """Teach the engine a new model family; refuses a family that has one already."""
    if model_type in EXECUTORS:
        raise ValueError(f"an executor for {model_type.__name__} is already registered")
    EXECUTORS[model_type] = builder


class SkippingEngine:
    """Runs a :class:`DecoupledNet` computing only the filters whose gate is on.

    ``engine(x)`` gives the logits of images (N, C, H, W) in [0, 1]; ``engine.forward_path(x)`` gives the
    :class:`PathOutput` of the model's own ``forward_path`` (same gates, MAC counts and pooled outputs)
    except ``LayerPath.encoding`` — every filter's pre-gate response, a training quantity — which is NaN
    because off filters are not computed. Both run under ``torch.inference_mode``; logits match the masked
    model to float32 rounding (relative error around 1e-7).

    Parameters
    ----------
    model : a DecoupledNet in eval mode (its BatchNorm running statistics are folded in); not modified.
    config : :class:`EngineConfig`, how batches of more than one image run.
    """

    def __init__(self, model: DecoupledNet, config: EngineConfig | None = None) -> None:
        if model.training:
            raise ValueError(
                "build the engine from a model in eval mode (model.eval()): it folds BatchNorm "
                "running statistics into the convolutions"
            )
        builder = next((b for t, b in EXECUTORS.items() if isinstance(model, t)), None)
        if builder is None:
            raise NotImplementedError(
                f"no engine executor for {type(model).__name__}; register one with "
                "detector.acceleration.engine.register_executor"
            )
        self.config = config or EngineConfig()
        self.executor = builder(model, self.config).eval().requires_grad_(False)
        self.mean, self.std = model.mean.clone(), model.std.clone()
        self.static_macs = model.static_macs()
        self.gated = model.gated

    @property
    def layers(self) -> list[EngineConv]:
        return [m for m in self.executor.modules() if isinstance(m, EngineConv)]

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, K) of images (N, C, H, W) in [0, 1]."""
        if torch.is_inference_mode_enabled():  # entering it costs more than a small layer at batch 1
            return self.executor.run((x - self.mean) / self.std, None)[0]
        with torch.inference_mode():
            return self.executor.run((x - self.mean) / self.std, None)[0]

    def forward_path(self, x: Tensor) -> PathOutput:
        """What :meth:`DecoupledNet.forward_path` returns, computed skipping off filters."""
        with torch.inference_mode():
            layers: list[LayerPath] = []
            logits, penultimate = self.executor.run((x - self.mean) / self.std, layers)
            macs = sum((layer.macs for layer in layers), torch.zeros_like(logits[:, 0])) + self.static_macs
            dense = self.static_macs + sum(layer.dense_macs for layer in layers)
            return PathOutput(logits, layers, penultimate, macs, dense)


def build_engine(model: DecoupledNet, *, batch_mode: str = "auto", gather_penalty: float = 1.5) -> SkippingEngine:
    """A :class:`SkippingEngine` for ``model`` (in eval mode); see :class:`EngineConfig`."""
    return SkippingEngine(model, EngineConfig(batch_mode=batch_mode, gather_penalty=gather_penalty))
