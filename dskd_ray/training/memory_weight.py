"""The memory's share of the fused map, chosen for each model from synthetic defects
(docs/design.md §2, "The memory's weight").

One fixed share does not suit every part. At ½, MTD's fused map scores 0.844 image AUROC while
the memory alone scores 0.941 (the students' maps are weak there and dilute it); on the demo's
brushed metal the students are the better half. Which member to trust is a property of the part,
and a training run can see it without one real defect: paste synthetic defects (the denoising
students' generator: cut-paste, Perlin blends, colour jitter, made from the images themselves)
into the held-out normal images, and rank each weight of a grid by how well the fused map's image
score separates them from the clean hold-out. The image AUROC decides (the verdict is made from
the image score); where it ties (with a few held-out images it often ties at 1), the weight
nearest ½ (`weight_key`). The chosen weight goes into the checkpoint's config,
so every path (Scorer, Ray, ONNX, tiling) scores with it, and the table into its meta.

The members are computed once per image; each weight's map is a weighted sum of the members'
blurred maps (the blur is linear), so the grid costs one forward pass per image, not eleven.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from dskd_ray.evaluation.metrics import image_auroc, pixel_auroc
from dskd_ray.model.anomaly_map import (
    apply_baseline,
    baseline_from_mean,
    gaussian_blur,
    image_score,
    member_weights,
)
from dskd_ray.model.inputs import images_to_tensor
from dskd_ray.model.network import DSKD
from dskd_ray.training.synthetic_defects import defect_generator, synthesize_defects

log = logging.getLogger(__name__)

WEIGHTS: tuple[float, ...] = tuple(i / 10 for i in range(11))  # 0 = the students alone, 1 = memory
DRAWS = 4  # synthetic copies of each held-out image (different defects)
BASELINE_IMAGES = 64  # training images whose mean map stands for the per-pixel baseline here
# Fewer held-out images than this and the weight stays as given: with 1–4 clean images against
# 4 synthetic copies each, an AUROC moves by ≥ 1/16 with one image, and the pick is noise.
MIN_HELD_OUT = 5
PIXEL_STRIDE = 4  # the tie-break's pixel AUROC reads every 4th row and column: 16× less memory
# The synthetic defects' random stream: a "rank" no training run has, so these draws are apart
# from the denoising students' (same generator, keyed by seed, epoch, step, rank).
DRAW_STREAM = 1_000_021


def weight_key(image: float, pixel: float, weight: float) -> tuple[float, float, float]:
    """How the grid is ranked: image AUROC (to 4 digits, as the table keeps it, so a difference
    in the noise never decides), then nearness to ½, then pixel AUROC (between w = ½ ± d).

    Where the image AUROCs tie, the weight stays nearest ½, the prior that weighs both views
    alike. Not the pixel AUROC first: the students' maps are sharper, so it leaned to them
    where their image scores were poor (demo brushed metal, seed 2: it picked 0.1, 0.852 image
    AUROC on the test set, where ½ gives 0.931)."""
    return round(image, 4), -round(abs(weight - 0.5), 6), round(pixel, 4)


@torch.inference_mode()
def fit_memory_weight(
    model: DSKD,
    normal: np.ndarray,
    train_images: np.ndarray | torch.Tensor,
    device: torch.device,
    batch_size: int,
) -> dict[str, Any]:
    """Choose `memory_weight` from WEIGHTS for a model with students and a memory whose level
    statistics and memory gain are fitted: set it in `model.config` and return what the
    checkpoint's meta keeps (the chosen weight and every weight's synthetic AUROCs).

    `normal` are held-out normal model inputs (uint8 (N, S, S, 3)); `train_images` a sample of
    training inputs, for the per-pixel baseline each weight's map would have."""
    assert model.memory is not None and model.config.has_students
    model.eval()
    cfg = model.config

    def blurred(x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] (B, 3, H, W) → (M, B, H, W): each member's map, blurred."""
        return torch.stack([gaussian_blur(m, cfg.blur_sigma) for m in model.members(x)])

    # Each member's mean blurred map over training images: a weight's baseline is their
    # weighted sum (the mean of a weighted sum), as fit_pixel_baseline would find it.
    n = len(train_images)
    pick = np.unique(np.linspace(0, n - 1, min(n, BASELINE_IMAGES)).round().astype(int))
    base = None
    for start in range(0, len(pick), batch_size):
        rows = pick[start : start + batch_size]
        members = blurred(images_to_tensor(np.asarray(train_images[rows]), device))
        total = members.double().sum(dim=1)
        base = total if base is None else base + total
    base = (base / len(pick)).float()  # (M, H, W)
    coefficients = torch.tensor([member_weights(len(base) - 1, w) for w in WEIGHTS], device=device)

    def fused(members: torch.Tensor) -> torch.Tensor:
        """(M, B, H, W) blurred members → (len(WEIGHTS), B, H, W) maps as the product makes them."""
        maps = torch.einsum("km,mbyx->kbyx", coefficients, members)
        if cfg.map_baseline == "none":
            return maps
        baselines = torch.einsum("km,myx->kyx", coefficients, base)
        out = []
        for w_maps, baseline in zip(maps, baselines, strict=True):
            if cfg.map_baseline == "mean":
                baseline = baseline_from_mean(baseline)
            out.append(apply_baseline(w_maps, baseline, cfg.map_baseline))
        return torch.stack(out)

    clean_scores, synthetic_scores, synthetic_maps, masks = [], [], [], []
    s = PIXEL_STRIDE
    for start in range(0, len(normal), batch_size):
        batch = images_to_tensor(np.asarray(normal[start : start + batch_size]), device)
        clean_scores.append(_scores(fused(blurred(batch)), cfg.score_top_k))
        for draw in range(DRAWS):
            generator = defect_generator(cfg.seed, draw, start, DRAW_STREAM, batch.device)
            corrupted, mask = synthesize_defects(batch, 1.0, generator)
            maps = fused(blurred(corrupted))
            synthetic_scores.append(_scores(maps, cfg.score_top_k))
            synthetic_maps.append(maps[:, :, ::s, ::s].cpu())
            masks.append(mask[:, ::s, ::s].cpu() > 0.5)
    clean = torch.cat(clean_scores, dim=1).numpy()  # (W, N)
    synthetic = torch.cat(synthetic_scores, dim=1).numpy()
    pixels = torch.cat(synthetic_maps, dim=1).numpy()  # (W, N·DRAWS, h, w)
    mask = torch.cat(masks).numpy()
    labels = np.r_[np.zeros(clean.shape[1]), np.ones(synthetic.shape[1])]
    table = []
    for i, weight in enumerate(WEIGHTS):
        image = image_auroc(labels, np.r_[clean[i], synthetic[i]])
        pixel = pixel_auroc(mask, pixels[i])
        table.append(
            {"weight": weight, "image_auroc": round(image, 4), "pixel_auroc": round(pixel, 4)}
        )
    best = max(table, key=lambda r: weight_key(r["image_auroc"], r["pixel_auroc"], r["weight"]))
    model.config = cfg.replace(memory_weight=best["weight"])
    log.info(
        "memory weight %.1f: synthetic defects in %d held-out inputs, image AUROC %.3f (½: %.3f)",
        best["weight"], len(normal), best["image_auroc"], table[WEIGHTS.index(0.5)]["image_auroc"],
    )  # fmt: skip
    return {"chosen": best["weight"], "by": "synthetic defects", "inputs": len(normal),
            "draws": DRAWS, "table": table}  # fmt: skip


def _scores(maps: torch.Tensor, top_k: int) -> torch.Tensor:
    """(W, B, H, W') → (W, B) image scores, on the CPU."""
    return torch.stack([image_score(m, top_k) for m in maps]).cpu()
