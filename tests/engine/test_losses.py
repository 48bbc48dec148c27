import math

import torch

from poe.engine.losses import ckd_loss, kd_loss


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def test_ckd_loss_matches_hand_computation():
    # One example, oracle over 4 classes, expert for task S = [3, 1] (in that output order).
    teacher = torch.tensor([[2.0, -1.0, 0.5, 4.0]])
    student = torch.tensor([[3.0, 0.0]])
    T = 4.0
    t_s = [4.0, -1.0]  # teacher sliced to S, in S's order
    p = _softmax([x / T for x in t_s])
    q = _softmax([x / T for x in [3.0, 0.0]])
    l_soft = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)) * T * T
    l_scale = (abs(3.0 - 4.0) + abs(0.0 - (-1.0))) / 2
    expected = l_soft + 0.3 * l_scale
    got = ckd_loss(student, teacher, torch.tensor([3, 1]))
    assert abs(float(got) - expected) < 1e-6


def test_ckd_terms_can_be_switched_off_for_ablation():
    teacher = torch.randn(5, 10)
    student = torch.randn(5, 3)
    task = torch.tensor([2, 5, 7])
    soft = ckd_loss(student, teacher, task, scale_weight=0.0)
    scale = ckd_loss(student, teacher, task, soft_weight=0.0)
    both = ckd_loss(student, teacher, task)
    assert torch.allclose(both, soft + scale, atol=1e-6)
    assert torch.allclose(scale, 0.3 * (student - teacher[:, task]).abs().mean())


def test_kd_loss_zero_for_identical_logits_and_positive_otherwise():
    x = torch.randn(4, 10)
    assert float(kd_loss(x, x)) < 1e-6
    assert float(kd_loss(x, x.flip(1))) > 0


def test_single_class_expert_learns_only_the_scale():
    teacher = torch.tensor([[1.0, 2.0, 3.0]])
    student = torch.tensor([[0.5]])
    # Softmax over one class is 1: L_soft vanishes, L_scale = |0.5 - 2|.
    assert abs(float(ckd_loss(student, teacher, torch.tensor([1]))) - 0.3 * 1.5) < 1e-6
