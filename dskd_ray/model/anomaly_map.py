"""Pixel anomaly maps and image scores from teacher–student discrepancy and the teacher's
memory (docs/design.md §2).

The map in five steps, each a function here so the quality bench can vary one at a time:
1. `level_maps`: per student and pyramid level, 1 − cos(T, S) along channels (or the mean
   squared difference, `distance="l2"`), at the level's own resolution; `memory_distances`:
   the teacher's memory level, each patch's distance to its nearest normal patch in the bank
   (`memory_features` are the patches).
2. `member_maps`: per student, each level standardised by statistics fitted on normal images
   ((m − location) / spread), upsampled to the input size, summed (or multiplied) over
   levels; `memory_member`: the memory level standardised, upsampled and put on a student's
   scale. `fuse_members`: the students' mean and the memory weighed by `member_weights`
   (`fuse_levels` for the students alone).
3. `gaussian_blur`.
4. `apply_baseline`: the per-pixel normal map subtracted (the default) or divided out.
5. `image_score`: the map's maximum, or the mean of its top-k pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dskd_ray.model.loss import level_discrepancy

STUDENT_ROWS = {"se": 0, "sd": 1}  # row of each student in the (2, 3) statistics buffers
# Distances held at once in the memory search, per image: the bank is searched in chunks of
# SEARCH_ELEMENTS // patches rows, so a batch of B images holds B × 4 MB of distances.
SEARCH_ELEMENTS = 2**20


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


# The teacher levels the memory holds, whichever pyramid the students distil.
MEMORY_STRIDES = (8, 16)


def memory_features(
    teacher: list[torch.Tensor], strides: tuple[int, ...] = (4, 8, 16)
) -> torch.Tensor:
    """(B, C8 + C16, H/8, W/8) float32: the teacher's patches as its memory holds them.

    PatchCore's recipe on our teacher: the stride-8 and stride-16 levels, each averaged over
    its 3×3 neighbourhood (zero padding counted, as PatchCore's AvgPool2d: border patches are
    damped alike in bank and query; not counting it cost MTD 0.737 vs 0.872 image AUROC), the
    stride-16 level upsampled to stride 8, concatenated. On MTD strides 8 + 16 beat 4 + 8 + 16
    (0.898 vs 0.878), and PatchCore's ablation also drops the finest level.
    """
    f8, f16 = (teacher[strides.index(s)].float() for s in MEMORY_STRIDES)
    f8 = F.avg_pool2d(f8, 3, stride=1, padding=1)
    f16 = F.avg_pool2d(f16, 3, stride=1, padding=1)
    f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([f8, f16], dim=1)


def memory_distances(patches: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) patches, (N, C) bank → (B, h, w): each patch's Euclidean distance to its
    nearest bank row.

    Exact search as matrix products, ‖q − b‖² = ‖q‖² + ‖b‖² − 2 q·b, over chunks of the bank
    so a batch holds at most B × SEARCH_ELEMENTS distances at once. Both sides are centred on
    the bank's mean first: the expansion subtracts numbers of the size of the squared norms,
    and centring makes those small, so float32 keeps the short distances (what normal
    patches have) and the exported graph agrees with PyTorch.
    """
    b, c, h, w = patches.shape
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty: it is fitted after training")
    centre = bank.mean(dim=0)
    queries = patches.permute(0, 2, 3, 1).reshape(b * h * w, c) - centre  # (B·h·w, C)
    rows = bank - centre
    chunk = max(256, SEARCH_ELEMENTS // (h * w))
    nearest: torch.Tensor | None = None
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]  # (K, C)
        # ‖b‖² − 2 q·b per pair; ‖q‖² is added once after the minimum.
        candidate = torch.addmm((part * part).sum(dim=1), queries, part.t(), alpha=-2).amin(dim=1)
        nearest = candidate if nearest is None else torch.minimum(nearest, candidate)
    assert nearest is not None
    squared = (nearest + (queries * queries).sum(dim=1)).clamp_min(0)
    return squared.sqrt().reshape(b, h, w)


def member_maps(
    levels: dict[str, list[torch.Tensor]],
    size: tuple[int, int],
    fusion: str = "sum",
    location: torch.Tensor | None = None,
    spread: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """[(B, H, W) per student]: its levels standardised, upsampled, fused.

    `location`, `spread`: (2, 3) tensors (row per student as STUDENT_ROWS, column per level);
    None means 0 and 1 (the raw discrepancy).
    """
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
    return per_student


def fuse_levels(
    levels: dict[str, list[torch.Tensor]],
    size: tuple[int, int],
    fusion: str = "sum",
    location: torch.Tensor | None = None,
    spread: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, H, W): the students' mean of `member_maps`."""
    if not levels:
        raise ValueError("no student features to compare with the teacher")
    return torch.stack(member_maps(levels, size, fusion, location, spread)).mean(dim=0)


def memory_member(
    distances: torch.Tensor, size: tuple[int, int], scale: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """(B, h, w) nearest-neighbour distances → (B, H, W) map member: upsampled like a student's
    levels and multiplied by `scale` (the model's gain ÷ the level's normal spread: one level
    standardised like every level, then put on a student's scale; docs/design.md §2)."""
    up = F.interpolate(distances.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    return up.squeeze(1) * scale


def moments(maps: torch.Tensor) -> torch.Tensor:
    """(3,) float64: pixel count, sum and sum of squares of `maps`, summed over batches."""
    m = maps.detach().double()
    return torch.tensor([m.numel(), float(m.sum()), float((m * m).sum())], dtype=torch.float64)


def spread_from_moments(total: torch.Tensor, normalization: str) -> float:
    """One map's spread from its `moments` on normal images, as `level_statistics` gives each
    student level's: its mean ("mean"), its std ("standardize"), or 1 ("none")."""
    count, sum_, squares = (float(v) for v in total)
    if count == 0 or normalization == "none":
        return 1.0
    mean = sum_ / count
    if normalization == "mean":
        return max(mean, 1e-6)
    return max(max(squares / count - mean * mean, 0.0) ** 0.5, 1e-6)


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
    baseline_mode: str = "subtract",  # as DSKDConfig.map_baseline
    memory: torch.Tensor | None = None,
    memory_scale: torch.Tensor | float = 1.0,
    distance: str = "cosine",
    memory_weight: float = 0.5,
) -> torch.Tensor:
    """(B, H, W) map from the network's pyramids and the memory's distances (`memory`, (B, h,
    w), or None): the members fused, blurred, then the per-pixel `baseline` (H, W) subtracted
    ("subtract") or divided out ("mean")."""
    members = member_maps(level_maps(features, distance), size, fusion, location, spread)
    weights = None
    if memory is not None:
        members.append(memory_member(memory, size, memory_scale))
        weights = member_weights(len(members) - 1, memory_weight)
    return fuse_members(members, sigma, baseline, baseline_mode, weights)


def member_weights(students: int, memory_weight: float) -> list[float] | None:
    """The weights of [each student's member…, the memory's]: the memory gets `memory_weight`,
    the students share the rest equally (so two students do not outvote the memory 2:1 merely
    by being two); None (equal) without students."""
    if students == 0:
        return None
    return [(1.0 - memory_weight) / students] * students + [memory_weight]


def fuse_members(
    members: list[torch.Tensor],
    sigma: float = 4.0,
    baseline: torch.Tensor | None = None,
    baseline_mode: str = "subtract",  # as DSKDConfig.map_baseline
    weights: list[float] | None = None,
) -> torch.Tensor:
    """(B, H, W): the members' mean (each student's fused levels, the memory's level), or their
    weighted sum with `weights` (`member_weights`), blurred, the per-pixel baseline removed."""
    if not members:
        raise ValueError("no student and no memory: nothing to compare with the teacher")
    if weights is None:
        fused = torch.stack(members).mean(dim=0)
    else:
        fused = sum(w * m for w, m in zip(weights, members, strict=True))
    maps = gaussian_blur(fused, sigma)
    return apply_baseline(maps, baseline, baseline_mode)


def apply_baseline(
    maps: torch.Tensor, baseline: torch.Tensor | None, mode: str = "subtract"
) -> torch.Tensor:
    """(B, H, W) maps with the per-pixel normal map removed: ÷ ("mean"), or − ("subtract") and
    what is left below zero cut off — the map then says how far above its usual discrepancy
    each pixel is, and stays non-negative like every map this library writes."""
    if baseline is None:
        return maps
    baseline = baseline.to(maps.dtype)
    return (maps - baseline).clamp_min(0) if mode == "subtract" else maps / baseline
