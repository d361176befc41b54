"""The distillation loss (docs/design.md §1, §3): Σ over students and levels of a per-level loss,
equal weights. Per level: Reverse Distillation's 1 − cos between each sample's whole flattened
level map ("flat", the default), or the mean over positions of 1 − cos(T, S) ("pixel", the
paper's); with distance="l2", the mean squared difference either way. Optionally the gradients
at the easiest positions are scaled down (hard mining)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Gradients at the easiest positions are multiplied by this under hard mining (Dinomaly's 0.1).
EASY_GRADIENT_SCALE = 0.1


def level_discrepancy(
    teacher: torch.Tensor, student: torch.Tensor, distance: str = "cosine"
) -> torch.Tensor:
    """1 − cosine similarity along channels: (B, C, H, W) × 2 → (B, H, W); or, with
    distance="l2", the mean squared difference over channels.

    Cosine is computed as ½‖t̂ − ŝ‖² of the unit vectors (equal in exact arithmetic): `1 − cos`
    subtracts two numbers near 1 exactly where the students are good, and loses float32 digits
    there. On a trained ResNet18 model this form halves the scores' float32 error against
    float64 (6e-6 vs 1.3e-5) and the ONNX export's score error (4e-6 vs 1e-5; docs/design.md
    §6). The L2 form subtracts the features themselves first, so it has no such cancellation.
    """
    if distance == "l2":
        return (teacher - student).pow(2).mean(dim=1)
    t = F.normalize(teacher, dim=1, eps=1e-8)
    s = F.normalize(student, dim=1, eps=1e-8)
    return 0.5 * (t - s).pow(2).sum(dim=1)


def flat_discrepancy(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """1 − cos between each sample's whole flattened level map: (B, C, H, W) × 2 → (B,).

    Reverse Distillation's official loss: one vector per sample and level, so a position counts
    by its feature's magnitude, not once each. Same ½‖t̂ − ŝ‖² form as `level_discrepancy`.
    """
    return level_discrepancy(teacher.flatten(1)[..., None], student.flatten(1)[..., None])[:, 0]


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by `weight` (broadcast) on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (weight,) = ctx.saved_tensors
        return grad * weight, None


def easy_position_weights(discrepancy: torch.Tensor, share: float) -> torch.Tensor:
    """(B, H, W) discrepancies → (B, 1, H, W) gradient weights: EASY_GRADIENT_SCALE at the
    `share` of positions (over the whole batch) with the lowest discrepancy, 1 elsewhere.

    As Dinomaly's mining: the threshold is the smallest of the hardest (1 − share) positions,
    and what lies below it is easy.
    """
    flat = discrepancy.detach().flatten()
    hard = flat.numel() - int(share * flat.numel())
    if hard <= 0:
        return torch.full_like(discrepancy, EASY_GRADIENT_SCALE).unsqueeze(1)
    threshold = flat.topk(hard).values[-1]
    easy = discrepancy.detach() < threshold
    weights = torch.where(easy, EASY_GRADIENT_SCALE, 1.0).to(discrepancy.dtype)
    return weights.unsqueeze(1)


def distillation_loss(
    teacher: list[torch.Tensor],
    students: dict[str, list[torch.Tensor]],
    form: str = "flat",
    hard_share: float = 0.0,
    distance: str = "cosine",
) -> torch.Tensor:
    """L = Σ_students Σ_k loss_k(T_k, S_k), equal weights, always in float32.

    form "flat": loss_k = mean_b(1 − cos(flatten(T_k[b]), flatten(S_k[b]))); "pixel":
    loss_k = mean_{b,h,w} of `level_discrepancy` (1 − cos along channels). With
    distance="l2" both forms are the mean squared difference: over a flattened map it is the
    per-pixel mean itself.

    `hard_share` > 0 scales the gradients at that share of each level's easiest positions by
    EASY_GRADIENT_SCALE (the value is unchanged, only what the students learn from).
    """
    total = teacher[0].new_zeros((), dtype=torch.float32)
    for pyramid in students.values():
        for t, s in zip(teacher, pyramid, strict=True):
            t, s = t.float(), s.float()
            if hard_share > 0:
                with torch.no_grad():
                    near = level_discrepancy(t, s, distance)
                s = _ScaleGradient.apply(s, easy_position_weights(near, hard_share))
            if form == "flat" and distance == "cosine":
                total = total + flat_discrepancy(t, s).mean()
            else:
                total = total + level_discrepancy(t, s, distance).mean()
    return total
