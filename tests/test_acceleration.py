"""The skipping engine matches the masked model for every registered architecture; FLOPs hand counts."""

import numpy as np
import pytest
import torch

from detector.acceleration import (
    BATCH_MODES,
    EngineConfig,
    SkippingEngine,
    build_engine,
    force_gates,
    set_gate_densities,
)
from detector.models import GateConfig, create_model, list_models
from detector.models.resnet import ResNet
from detector.models.vgg import VGG

REL_TOL = 1e-5


def _images(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, model.in_channels, model.input_size, model.input_size, generator=g)


def _randomise_batchnorm(model, seed=0):
    """Non-trivial running statistics and affine parameters, so that folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


_MODELS: dict = {}


def _mixed_model(arch):
    """``arch`` at random init, gates set on calibration images to be on for 30-60% of inputs (cached)."""
    if arch not in _MODELS:
        torch.manual_seed(0)
        model = create_model(arch, num_classes=5).eval()
        _randomise_batchnorm(model)
        set_gate_densities(model, _images(model, 24, seed=1), (0.3, 0.6), seed=0)
        _MODELS[arch] = model
    return _MODELS[arch]


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _assert_same_path(out, ref):
    assert _rel_err(out.logits, ref.logits) <= REL_TOL
    assert torch.equal(out.hard_path, ref.hard_path)
    torch.testing.assert_close(out.soft_path, ref.soft_path, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.macs, ref.macs)
    assert out.dense_macs == ref.dense_macs
    assert [layer.name for layer in out.layers] == [layer.name for layer in ref.layers]
    for a, b in zip(out.layers, ref.layers):
        torch.testing.assert_close(a.pooled, b.pooled, rtol=1e-4, atol=1e-5 * float(b.pooled.abs().max()) + 1e-7)
    torch.testing.assert_close(
        out.penultimate, ref.penultimate, rtol=1e-4, atol=1e-5 * float(ref.penultimate.abs().max()) + 1e-7
    )


@pytest.mark.parametrize("arch", list_models())
def test_engine_matches_masked_model(arch):
    model = _mixed_model(arch)
    x = _images(model, 6, seed=2)
    with torch.no_grad():
        ref = model.forward_path(x)
    density = ref.density.mean().item()
    assert 0.15 < density < 0.85, "the gates should be mixed for this test to mean anything"
    assert len({tuple(r) for r in ref.hard_path.int().tolist()}) == len(x), "paths should differ per input"
    for mode in BATCH_MODES:
        engine = build_engine(model, batch_mode=mode)
        _assert_same_path(engine.forward_path(x), ref)
        assert _rel_err(engine(x), ref.logits) <= REL_TOL
    engine = build_engine(model)
    for i in range(2):  # batch 1 runs its own code path
        one = engine.forward_path(x[i : i + 1])
        with torch.no_grad():
            _assert_same_path(one, model.forward_path(x[i : i + 1]))


@pytest.mark.parametrize("arch", list_models())
def test_all_off_and_all_on_layers(arch):
    torch.manual_seed(1)
    model = create_model(arch, num_classes=4).eval()
    _randomise_batchnorm(model, seed=1)
    set_gate_densities(model, _images(model, 16, seed=3), (0.3, 0.6), seed=1)
    layers = [m for _, m in model.gated_layers()]
    force_gates(layers[0], [True] * layers[0].conv.out_channels)  # all on
    force_gates(layers[1], [False] * layers[1].conv.out_channels)  # all off: the next layer reads nothing
    on = [j % 3 == 0 for j in range(layers[-1].conv.out_channels)]
    force_gates(layers[-1], on)  # the same few filters for every input
    if isinstance(model, ResNet):  # a block whose residual branch is entirely off, and one all on
        force_gates(model.blocks[-2].conv2, [False] * model.blocks[-2].conv2.conv.out_channels)
        force_gates(model.blocks[-3].conv1, [True] * model.blocks[-3].conv1.conv.out_channels)
    x = _images(model, 4, seed=4)
    with torch.no_grad():
        ref = model.forward_path(x)
    assert ref.layers[1].hard.sum() == 0 and bool((ref.layers[0].hard == 1).all())
    for mode in BATCH_MODES:
        _assert_same_path(build_engine(model, batch_mode=mode).forward_path(x), ref)
    one = build_engine(model).forward_path(x[:1])
    with torch.no_grad():
        _assert_same_path(one, model.forward_path(x[:1]))


@pytest.mark.parametrize("arch", list_models())
def test_engine_on_dense_twin_folds_batchnorm_exactly(arch):
    torch.manual_seed(2)
    dense = create_model(arch, gated=False, num_classes=3).eval()
    _randomise_batchnorm(dense, seed=2)
    x = _images(dense, 3, seed=5)
    engine = build_engine(dense)
    with torch.no_grad():
        ref = dense(x)
    assert _rel_err(engine(x), ref) <= REL_TOL
    assert _rel_err(engine(x[:1]), ref[:1]) <= REL_TOL


def test_engine_leaves_the_model_alone_and_refuses_training_mode():
    model = _mixed_model("vgg8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_engine(model)(_images(model, 2, seed=6))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="eval mode"):
        SkippingEngine(create_model("vgg8").train())
    with pytest.raises(ValueError, match="batch_mode='fast'"):
        EngineConfig(batch_mode="fast")
    with pytest.raises(ValueError, match="gather_penalty=0"):
        EngineConfig(gather_penalty=0)


def test_unknown_architecture_is_refused():
    class Other(VGG):
        pass

    import detector.acceleration.engine as engine_module

    saved = dict(engine_module.EXECUTORS)
    try:
        engine_module.EXECUTORS.pop(VGG)
        with pytest.raises(NotImplementedError, match="no engine executor for Other"):
            SkippingEngine(Other(((4,),), input_size=8, gate=GateConfig()).eval())
    finally:
        engine_module.EXECUTORS.clear()
        engine_module.EXECUTORS.update(saved)


def test_set_gate_densities_hits_its_target():
    model = create_model("vgg8", num_classes=3).eval()
    x = _images(model, 40, seed=7)
    targets = set_gate_densities(model, x, 0.4, seed=3)
    assert targets == pytest.approx([0.4] * 6)
    with torch.no_grad():
        density = model.forward_path(x).density.mean(0)
    assert torch.allclose(density, torch.full_like(density, 0.4), atol=0.1)


# -- executed FLOPs, counted by hand ---------------------------------------------------------------------------
def test_resnet_flops_match_hand_count():
    # stem 1 -> 4 at 8x8; block0 4 -> 4 (identity shortcut); block1 4 -> 8, stride 2 (1x1 projection); 3 classes
    model = ResNet(
        1, widths=(4, 8), num_classes=3, in_channels=1, input_size=8, gate=GateConfig(), mean=(0.5,), std=(0.5,)
    )
    b0, b1 = model.blocks
    force_gates(b0.conv1, [True, False, True, False])  # 2 of 4
    force_gates(b0.conv2, [True, True, True, False])  # 3 of 4
    force_gates(b1.conv1, [True] * 5 + [False] * 3)  # 5 of 8
    force_gates(b1.conv2, [False, True, False, True, False, False, False, False])  # 2 of 8
    model.eval()
    hidden = 8  # max(C_out // 4, 8) for every layer here
    stem = 1 * 4 * 9 * 64
    b0_conv1 = 4 * 2 * 9 * 64 + (4 * hidden + hidden * 4)  # input: the full residual stream, 4 channels
    b0_conv2 = 2 * 3 * 9 * 64 + (4 * hidden + hidden * 4)  # input: conv1's 2 active channels
    b1_conv1 = 4 * 5 * 9 * 16 + (4 * hidden + hidden * 8)  # stride 2: 4x4 outputs
    b1_conv2 = 5 * 2 * 9 * 16 + (8 * hidden + hidden * 8)
    shortcut = 4 * 8 * 16
    head = 8 * 3
    expected = stem + b0_conv1 + b0_conv2 + b1_conv1 + b1_conv2 + shortcut + head
    dense = stem + 2 * (4 * 4 * 9 * 64) + 4 * 8 * 9 * 16 + 8 * 8 * 9 * 16 + shortcut + head
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        out = model.forward_path(x)
    assert out.dense_macs == dense
    assert torch.allclose(out.macs, torch.full((2,), float(expected)))
    engine_out = build_engine(model).forward_path(x)
    assert torch.allclose(engine_out.macs, out.macs) and engine_out.dense_macs == dense
    assert np.isclose(float(out.flops_ratio[0]), expected / dense)


def test_vgg_hidden_head_layer_counted():
    # the MLP head's hidden Linear is part of the executed (ungated) cost
    model = VGG(
        ((4,),), num_classes=3, in_channels=1, input_size=4, head_hidden=5, gate=GateConfig(), mean=(0.5,), std=(0.5,)
    )
    force_gates(model.features[0], [True, True, False, False])
    model.eval()
    with torch.no_grad():
        out = model.forward_path(torch.rand(1, 1, 4, 4))
    head = 4 * 2 * 2 * 5 + 5 * 3
    assert out.dense_macs == 1 * 4 * 9 * 16 + head
    assert out.macs.item() == 1 * 2 * 9 * 16 + (1 * 8 + 8 * 4) + head


# -- the screener's engine option ------------------------------------------------------------------------------
def test_screener_skipping_engine_matches_masked(tiny_bundle):
    from synthetic import make_images

    from detector import load_bundle

    bundle = load_bundle(tiny_bundle)
    x = torch.from_numpy(make_images(24, seed=9)[0])
    masked = bundle.screener().screen(x)
    fast = bundle.screener(engine="skipping", batch_size=10).screen(x)
    one = bundle.screener(engine="skipping").screen(x[:1])
    np.testing.assert_array_equal(fast.predictions, masked.predictions)
    np.testing.assert_array_equal(fast.paths, masked.paths)
    np.testing.assert_array_equal(fast.flags, masked.flags)
    for field in ("probabilities", "active_ratio", "flops_ratio", "departure"):
        np.testing.assert_allclose(getattr(fast, field), getattr(masked, field), rtol=1e-5, atol=1e-6)
    # The score is a function of distances between feature rows that agree to ~1e-6: folding batch norm changes
    # the float rounding (and it differs with the thread count), which the kNN and the null's tail can amplify
    # to ~1e-4 relative (seen on one thread). A wrong channel or scale would be off by far more.
    np.testing.assert_allclose(fast.scores, masked.scores, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(one.scores, masked.scores[:1], rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="engine='fast' must be one of"):
        bundle.screener(engine="fast")
