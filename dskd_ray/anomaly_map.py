"""Pixel anomaly maps and image scores from teacher–student discrepancy (DESIGN §1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dskd_ray.loss import level_discrepancy


def gaussian_kernel1d(sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian; radius 4σ, so σ = 4 gives the usual kernel of 33."""
    radius = int(math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable blur of (B, H, W) maps with reflected borders: two thin convs, not one 33×33."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, maps.device).to(maps.dtype)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)  # (B, 1, H, W)
    # Reflection needs the pad below the size; tiny maps fall back to replicate.
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def student_map(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    size: tuple[int, int],
    fusion: str = "sum",
    scales: list[float] | None = None,
) -> torch.Tensor:
    """One student's map: per-level 1 − cos, upsampled bilinearly to `size`, fused by sum/product.

    `scales` divides each level's discrepancy (its mean on normal images) before fusing.
    """
    fused: torch.Tensor | None = None
    for k, (t, s) in enumerate(zip(teacher, student, strict=True)):
        level = level_discrepancy(t.float(), s.float()).unsqueeze(1)  # (B, 1, h, w)
        if scales is not None:
            level = level / scales[k]
        level = F.interpolate(level, size=size, mode="bilinear", align_corners=False).squeeze(1)
        if fused is None:
            fused = level
        elif fusion == "product":
            fused = fused * level
        else:
            fused = fused + level
    assert fused is not None
    return fused


def anomaly_map(
    features: dict[str, list[torch.Tensor]],
    size: tuple[int, int],
    fusion: str = "sum",
    sigma: float = 4.0,
    scales: dict[str, list[float]] | None = None,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, H, W) map: the students' maps averaged, blurred, then divided by `baseline` (H, W).

    `features` as DSKD.forward gives.
    """
    teacher = features["teacher"]
    students = [
        student_map(teacher, v, size, fusion, scales[k] if scales else None)
        for k, v in features.items()
        if k != "teacher"
    ]
    if not students:
        raise ValueError("no student features to compare with the teacher")
    mean = torch.stack(students).mean(dim=0)
    maps = gaussian_blur(mean, sigma)
    return maps if baseline is None else maps / baseline.to(maps.dtype)


def image_score(maps: torch.Tensor) -> torch.Tensor:
    """Image score = max of its map: (B, H, W) → (B,)."""
    return maps.flatten(1).amax(dim=1)
