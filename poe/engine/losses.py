"""Distillation losses: KD for the library, CKD (L_soft + L_scale) for the experts (docs/METHOD.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch (soft targets only)."""
    t = F.log_softmax(teacher.float() / temperature, dim=1)
    s = F.log_softmax(student.float() / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def ckd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    task_classes: torch.Tensor,
    temperature: float = 4.0,
    scale_weight: float = 0.3,
    soft_weight: float = 1.0,
) -> torch.Tensor:
    """Conditional KD for one expert: L_soft + 0.3 * L_scale against the oracle sliced to the task.

    student: expert logits [N, |S|]; teacher: oracle logits [N, C]; task_classes: the task's class
    ids in the expert's output order. `soft_weight` and `scale_weight` exist for the ablation that
    trains on one term only (benchmarks); the product uses 1.0 and 0.3.
    """
    t = teacher.float()[:, task_classes]
    loss = student.new_zeros((), dtype=torch.float32)
    if soft_weight:
        loss = loss + soft_weight * kd_loss(student, t, temperature)
    if scale_weight:
        loss = loss + scale_weight * (student.float() - t).abs().mean()
    return loss
