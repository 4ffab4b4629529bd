"""Each loss term of METHOD.md section 2 on hand-made inputs."""

import math

import torch

from detector.training import losses


def test_infomax_prefers_decided_and_diverse_gates():
    decided_diverse = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    undecided = torch.full((4, 2), 0.5)
    decided_same = torch.ones(4, 2)
    assert math.isclose(float(losses.infomax_loss(decided_diverse)), -math.log(2), rel_tol=1e-3)
    assert abs(float(losses.infomax_loss(undecided))) < 1e-6
    assert abs(float(losses.infomax_loss(decided_same))) < 1e-3
    assert losses.infomax_loss(decided_diverse) < losses.infomax_loss(undecided)


def test_sparsity_is_mean_gate():
    p = torch.tensor([[1.0, 0.0, 0.5, 0.5]])
    assert float(losses.sparsity_loss(p)) == 0.5


def test_align_zero_when_gate_equals_encoding_and_grows_with_distance():
    e = torch.tensor([[1.0, 0.2, 0.0]])
    assert float(losses.align_loss(e, e.clone())) == 0.0
    near, far = torch.tensor([[0.9, 0.3, 0.1]]), torch.tensor([[0.0, 1.0, 1.0]])
    assert losses.align_loss(e, near) < losses.align_loss(e, far)
    assert losses.align_loss(e, near, "bce") < losses.align_loss(e, far, "bce")


def test_mi_variational_is_cross_entropy_of_path_head():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    good = losses.mi_variational_loss(logits, torch.tensor([0, 1]))
    bad = losses.mi_variational_loss(logits, torch.tensor([1, 0]))
    assert good < 0.01 < bad


def test_onesided_align_only_asks_switched_off_filters_to_be_silent():
    e = torch.tensor([[1.0, 0.4, 0.0]])
    # a gate on for every responding filter costs nothing, whatever the filters' strength (no pull to the max)
    assert float(losses.onesided_align_loss(e, torch.tensor([[1.0, 1.0, 0.0]]))) == 0.0
    assert float(losses.onesided_align_loss(e, torch.tensor([[1.0, 1.0, 1.0]]))) == 0.0
    # switching off a responding filter costs its response
    off = float(losses.onesided_align_loss(e, torch.tensor([[1.0, 0.0, 0.0]])))
    assert math.isclose(off, 0.4 / 3, rel_tol=1e-6)
    # the symmetric MSE would pull the 0.4 filter's gate down to 0.4: the one-sided term does not
    p = torch.tensor([[1.0, 1.0, 0.0]], requires_grad=True)
    losses.onesided_align_loss(e, p).backward()
    assert float(p.grad[0, 1]) <= 0  # never pushes an on gate of a responding filter down


def test_rescaled_encoding_has_the_asked_mean():
    e = torch.tensor([[1.0, 0.5, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2]])
    r = losses.rescale_encoding(e, 0.25)
    assert torch.allclose(r.mean(1), torch.tensor([0.25, 0.25]), atol=1e-6)
    assert float(r.max()) <= 1.0


def test_flops_target_is_zero_at_target_and_pulls_towards_it():
    r = torch.tensor([0.2, 0.4], requires_grad=True)
    loss = losses.flops_target_loss(r, 0.3)
    assert float(loss.detach()) < 1e-12
    r2 = torch.tensor([0.6, 0.8], requires_grad=True)
    losses.flops_target_loss(r2, 0.3).backward()
    assert bool((r2.grad > 0).all())  # gradient descent lowers executed FLOPs that exceed the target


def test_distillation_is_zero_for_the_teacher_itself_and_positive_otherwise():
    t = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.1, 0.0]])
    assert abs(float(losses.distill_loss(t, t, 4.0))) < 1e-6
    assert float(losses.distill_loss(t.flip(1), t, 4.0)) > 0.01
