"""Pixel anomaly maps and image scores from teacher–student discrepancy (docs/design.md §2).

The map in four steps, each a function here so the quality bench can vary one at a time:
1. `level_maps`: per student and pyramid level, 1 − cos(T, S) along channels (or the mean
   squared difference, `distance="l2"`), at the level's own resolution.
2. `fuse_levels`: each level standardised by statistics fitted on normal images
   ((m − location) / spread), upsampled to the input size, summed (or multiplied) over levels,
   averaged over students.
3. `gaussian_blur`.
4. `image_score`: the map's maximum, or the mean of its top-k pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dskd_ray.loss import level_discrepancy

STUDENT_ROWS = {"se": 0, "sd": 1}  # row of each student in the (2, 3) statistics buffers


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


def level_maps(
    features: dict[str, list[torch.Tensor]], distance: str = "cosine"
) -> dict[str, list[torch.Tensor]]:
    """{student: [(B, h_k, w_k) for each level]}: 1 − cos(T_k, S_k) (or, distance="l2", the
    mean squared difference over channels), float32, native size.

    `features` as DSKD.forward gives ({"teacher": [...], "se": [...], "sd": [...]}).
    """
    teacher = features["teacher"]
    return {
        name: [
            level_discrepancy(t.float(), s.float(), distance)
            for t, s in zip(teacher, pyramid, strict=True)
        ]
        for name, pyramid in features.items()
        if name != "teacher"
    }


def level_moments(levels: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """(3, 2, 3) float64: pixel count, sum and sum of squares per student row and level.

    Summed over batches, they give the normal statistics of `level_statistics`.
    """
    moments = torch.zeros(3, 2, 3, dtype=torch.float64)
    for name, maps in levels.items():
        row = STUDENT_ROWS[name]
        for k, m in enumerate(maps):
            m = m.detach().double()
            moments[0, row, k] = m.numel()
            moments[1, row, k] = m.sum().cpu()
            moments[2, row, k] = (m * m).sum().cpu()
    return moments


def level_statistics(
    moments: torch.Tensor, normalization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(location, spread), each (2, 3) float32, from `level_moments` of normal images.

    "mean": (0, mean), so levels are divided by their normal mean; "standardize": (0, std), so
    each level is in units of its normal spread; "none": (0, 1). An absent student keeps (0, 1).

    Standardising keeps location 0 on purpose: subtracting each level's normal mean would only
    shift the fused map by a constant (ranks, AUROC and AUPRO unchanged) and make it signed,
    which the 16-bit map files and a divided baseline cannot hold.
    """
    count, total, squares = moments
    present = count > 0
    mean = torch.where(present, total / count.clamp_min(1), 0.0)
    std = torch.where(present, (squares / count.clamp_min(1) - mean**2).clamp_min(0).sqrt(), 1.0)
    location, spread = torch.zeros(2, 3), torch.ones(2, 3)
    if normalization == "mean":
        spread = torch.where(present, mean.clamp_min(1e-6), 1.0).float()
    elif normalization == "standardize":
        spread = torch.where(present, std.clamp_min(1e-6), 1.0).float()
    return location, spread


def fuse_levels(
    levels: dict[str, list[torch.Tensor]],
    size: tuple[int, int],
    fusion: str = "sum",
    location: torch.Tensor | None = None,
    spread: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, H, W): per student, levels standardised, upsampled, fused; then the students' mean.

    `location`, `spread`: (2, 3) tensors (row per student as STUDENT_ROWS, column per level);
    None means 0 and 1 (the raw discrepancy).
    """
    if not levels:
        raise ValueError("no student features to compare with the teacher")
    per_student = []
    for name, maps in levels.items():
        row = STUDENT_ROWS[name]
        fused: torch.Tensor | None = None
        for k, level in enumerate(maps):
            if location is not None:
                level = level - location[row, k]
            if spread is not None:
                level = level / spread[row, k]
            level = F.interpolate(
                level.unsqueeze(1), size=size, mode="bilinear", align_corners=False
            ).squeeze(1)  # (B, H, W)
            if fused is None:
                fused = level
            elif fusion == "product":
                fused = fused * level
            else:
                fused = fused + level
        assert fused is not None
        per_student.append(fused)
    return torch.stack(per_student).mean(dim=0)


def baseline_from_mean(mean_map: torch.Tensor) -> torch.Tensor:
    """The per-pixel divisor from the normal mean map; a floor of 0.1× its mean keeps near-zero
    pixels from blowing up the ratio."""
    floor = 0.1 * float(mean_map.mean())
    return mean_map.clamp_min(max(floor, 1e-12))


def image_score(maps: torch.Tensor, top_k: int = 1) -> torch.Tensor:
    """(B, H, W) → (B,): the map's max (top_k=1) or the mean of its top_k highest pixels."""
    flat = maps.flatten(1)
    if top_k <= 1:
        return flat.amax(dim=1)
    return flat.topk(min(top_k, flat.shape[1]), dim=1).values.mean(dim=1)


def anomaly_map(
    features: dict[str, list[torch.Tensor]],
    size: tuple[int, int],
    fusion: str = "sum",
    sigma: float = 4.0,
    location: torch.Tensor | None = None,
    spread: torch.Tensor | None = None,
    baseline: torch.Tensor | None = None,
    baseline_mode: str = "mean",
    distance: str = "cosine",
) -> torch.Tensor:
    """(B, H, W) map from the network's pyramids: fused levels, blurred, then the per-pixel
    `baseline` (H, W) divided out ("mean") or subtracted ("subtract")."""
    levels = level_maps(features, distance)
    maps = gaussian_blur(fuse_levels(levels, size, fusion, location, spread), sigma)
    return apply_baseline(maps, baseline, baseline_mode)


def apply_baseline(
    maps: torch.Tensor, baseline: torch.Tensor | None, mode: str = "mean"
) -> torch.Tensor:
    """(B, H, W) maps with the per-pixel normal map removed: ÷ ("mean"), or − ("subtract") and
    what is left below zero cut off — the map then says how far above its usual discrepancy
    each pixel is, and stays non-negative like every map this library writes."""
    if baseline is None:
        return maps
    baseline = baseline.to(maps.dtype)
    return (maps - baseline).clamp_min(0) if mode == "subtract" else maps / baseline
