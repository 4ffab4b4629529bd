"""Registry-driven checks of every decoupled model, gated and dense."""

import pytest
import torch

from detector.models import GateConfig, GatedConv, create_model, list_models
from detector.models.vgg import VGG


def _input(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, model.in_channels, model.input_size, model.input_size, generator=g)


@pytest.mark.parametrize("arch", list_models())
@pytest.mark.parametrize("gated", [True, False])
def test_logits_shape_and_finite(arch, gated):
    model = create_model(arch, gated=gated, num_classes=7).eval()
    out = model.forward_path(_input(model))
    assert out.logits.shape == (3, 7)
    assert torch.isfinite(out.logits).all()
    assert torch.equal(model(_input(model)), out.logits)
    assert len(out.layers) == len(model.gated_layers())
    assert out.soft_path.shape == out.hard_path.shape == (3, sum(model.gate_sizes))
    assert set(out.hard_path.unique().tolist()) <= {0.0, 1.0}
    assert model.gated == gated
    assert (model.path_head is not None) == gated


@pytest.mark.parametrize("arch", list_models())
def test_gradients_reach_controlling_modules(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=5).train()
    out = model.forward_path(_input(model, n=4))
    # loss that depends on the gates only through the (hard) gated activations
    out.logits.sum().backward()
    acms = [m.acm for _, m in model.gated_layers()]
    assert all(a.fc2.weight.grad is not None for a in acms)
    assert sum(float(a.fc2.weight.grad.abs().sum()) for a in acms) > 0


@pytest.mark.parametrize("arch", list_models())
def test_paths_deterministic_in_eval(arch):
    model = create_model(arch, num_classes=4).eval()
    x = _input(model)
    a, b = model.forward_path(x), model.forward_path(x)
    assert torch.equal(a.hard_path, b.hard_path)
    assert torch.equal(a.soft_path, b.soft_path)


@pytest.mark.parametrize("arch", list_models())
def test_dense_twin_has_no_gates_and_full_flops(arch):
    dense = create_model(arch, gated=False).eval()
    out = dense.forward_path(_input(dense))
    assert not any(m.gated for _, m in dense.gated_layers())
    assert torch.allclose(out.flops_ratio, torch.ones(3))


def test_registry_refuses_duplicates_and_unknown():
    from detector.models.registry import register_model

    def vgg8(**kwargs):
        return None

    with pytest.raises(ValueError, match="'vgg8' is already registered"):
        register_model(vgg8)
    with pytest.raises(ValueError, match="not a registered model"):
        create_model("vgg99")


def _force_gates(layer: GatedConv, on: list[bool]) -> None:
    """Make a controlling module output fixed gates: zero weights, bias +-10."""
    with torch.no_grad():
        layer.acm.fc2.weight.zero_()
        layer.acm.fc2.bias.copy_(torch.tensor([10.0 if o else -10.0 for o in on]))


def test_flops_match_hand_count():
    # two stages of one conv each: 1 -> 4 channels at 8x8, then 4 -> 6 at 4x4, flatten 6*2*2 -> 3 classes
    model = VGG(
        ((4,), (6,)),
        num_classes=3,
        in_channels=1,
        input_size=8,
        head_hidden=0,
        gate=GateConfig(),
        mean=(0.5,),
        std=(0.5,),
    )
    l0, l1 = model.features
    _force_gates(l0, [True, False, True, False])  # 2 of 4 on
    _force_gates(l1, [True, True, True, False, False, False])  # 3 of 6 on
    model.eval()
    out = model.forward_path(torch.rand(2, 1, 8, 8))
    acm0 = 1 * 8 + 8 * 4  # hidden = max(4 // 4, 8) = 8
    acm1 = 4 * 8 + 8 * 6
    conv0 = 1 * 2 * 9 * 8 * 8  # in 1, out 2 active
    conv1 = 2 * 3 * 9 * 4 * 4  # in 2 active, out 3 active
    head = 6 * 2 * 2 * 3
    expected = conv0 + acm0 + conv1 + acm1 + head
    dense = 1 * 4 * 9 * 64 + 4 * 6 * 9 * 16 + head
    assert out.dense_macs == dense
    assert torch.allclose(out.macs, torch.full((2,), float(expected)))
    assert torch.allclose(out.density, torch.tensor([[0.5, 0.5], [0.5, 0.5]]))


def test_all_off_layer_silences_output():
    model = create_model("vgg8", num_classes=3).eval()
    _force_gates(model.features[2], [False] * model.features[2].conv.out_channels)
    out = model.forward_path(torch.rand(2, 1, 28, 28))
    assert out.layers[2].hard.sum() == 0
    assert out.layers[2].pooled.abs().sum() == 0
    # the next layer then executes no input channels: only its controlling module costs anything
    assert torch.allclose(out.layers[3].macs, torch.full((2,), float(model.features[3].acm.macs())))


def test_straight_through_in_eval_changes_gradients_not_values():
    from detector.models import straight_through

    model = create_model("vgg8", num_classes=3).eval()
    x = torch.rand(2, 1, 28, 28)
    plain = model.forward_path(x)
    plain.soft_path.sum().backward()  # soft path has gradients either way
    model.zero_grad()
    out = model.forward_path(x)
    out.hard_path.sum().backward() if out.hard_path.requires_grad else None
    assert model.features[0].acm.fc2.weight.grad is None, "hard gates carry no gradient in plain eval"
    with straight_through(model):
        st = model.forward_path(x)
        assert torch.equal(st.hard_path, plain.hard_path) and torch.equal(st.logits, plain.logits)
        st.hard_path.sum().backward()
    assert model.features[0].acm.fc2.weight.grad.abs().sum() > 0
    assert not model.features[0].acm.straight_through, "the flag is restored on exit"


def test_gate_and_pool_gradients_match_two_separate_ops():
    from detector.models.gates import GateAndPool

    torch.manual_seed(0)
    for use_y, use_mean in ((1, 1), (1, 0), (0, 1)):
        a = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        g = (torch.rand(3, 4, dtype=torch.float64) > 0.5).double().requires_grad_()
        wy, wm = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
        y, m = GateAndPool.apply(a, g)
        assert torch.equal(y, a * g[:, :, None, None]) and torch.allclose(m, a.mean((2, 3)))
        got = torch.autograd.grad(use_y * (y * wy).sum() + use_mean * (m * wm).sum(), (a, g), allow_unused=True)
        a2, g2 = a.detach().requires_grad_(), g.detach().requires_grad_()
        two_ops = use_y * (a2 * g2[:, :, None, None] * wy).sum() + use_mean * (a2.mean((2, 3)) * wm).sum()
        ref = torch.autograd.grad(two_ops, (a2, g2))
        assert torch.allclose(got[0], ref[0])
        assert torch.allclose(got[1] if got[1] is not None else torch.zeros_like(ref[1]), ref[1])


def test_executed_flops_carry_the_straight_through_gradient_while_training():
    model = create_model("vgg8", gated=True, num_classes=4, in_channels=1, input_size=16, mean=[0.5], std=[0.5])
    model.train()
    out = model.forward_path(torch.rand(2, 1, 16, 16))
    out.flops_ratio.mean().backward()
    acm_grads = [m.acm.fc2.bias.grad for _, m in model.gated_layers()]
    assert all(g is not None and bool((g > 0).all()) for g in acm_grads)  # more gates on, more FLOPs
