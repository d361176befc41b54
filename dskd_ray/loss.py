"""The distillation loss (docs/design.md §1): Σ over students and levels of mean(1 − cos(T, S))."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def level_discrepancy(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """1 − cosine similarity along channels: (B, C, H, W) × 2 → (B, H, W)."""
    return 1.0 - F.cosine_similarity(teacher, student, dim=1)


def distillation_loss(
    teacher: list[torch.Tensor], students: dict[str, list[torch.Tensor]]
) -> torch.Tensor:
    """L = Σ_students Σ_k mean_{b,h,w}(1 − cos(T_k, S_k)), equal weights."""
    total = teacher[0].new_zeros(())
    for pyramid in students.values():
        for t, s in zip(teacher, pyramid, strict=True):
            total = total + level_discrepancy(t.float(), s.float()).mean()
    return total
