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
