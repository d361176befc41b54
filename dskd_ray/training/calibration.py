"""After the last epoch (docs/design.md §3): the statistics that put the map on its scale, the
per-pixel baseline, and the threshold, each fitted on the maps the previous step leaves."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from dskd_ray.config import DSKDConfig
from dskd_ray.inference import tiling
from dskd_ray.inference.scoring import ModelScorer
from dskd_ray.model.anomaly_map import (
    baseline_from_mean,
    level_maps,
    level_moments,
    level_statistics,
    moments,
    spread_from_moments,
)
from dskd_ray.model.checkpoint import (
    Threshold,
)
from dskd_ray.model.inputs import images_to_tensor
from dskd_ray.model.network import DSKD
from dskd_ray.training.memory_weight import MIN_HELD_OUT, fit_memory_weight

log = logging.getLogger(__name__)


@torch.inference_mode()
def image_scores(
    model: DSKD, images: np.ndarray | list[np.ndarray], device: torch.device, batch_size: int
) -> np.ndarray:
    """Image scores of (N, S, S, 3) uint8 images, or, for a tiled model, of full-resolution
    images scored as `dskd score` scores them: tiled, stitched, the score from the whole map."""
    model.eval()
    return ModelScorer(model, device, batch_size).score_images(images).scores


@torch.inference_mode()
def fit_level_statistics(
    model: DSKD, images: np.ndarray, device: torch.device, batch_size: int
) -> None:
    """Set model.level_location / level_spread from each student's level maps on normal images,
    pooled over every pixel of every image (see `anomaly_map.level_statistics`), and the
    memory's distance map's spread the same way (one more level)."""
    model.eval()
    student = torch.zeros(3, 2, 3, dtype=torch.float64)
    memory = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = model.normalize(images_to_tensor(images[start : start + batch_size], device))
        teacher, features = model.pyramids(x)
        student += level_moments(level_maps(features, model.config.distance))
        if model.memory is not None:
            memory += moments(model.memory.distances(teacher, model.config.strides))
    normalization = model.config.level_normalization
    location, spread = level_statistics(student, normalization)
    model.level_location.copy_(location.to(model.level_location.device))
    model.level_spread.copy_(spread.to(model.level_spread.device))
    if model.memory is not None:
        model.memory.spread.fill_(spread_from_moments(memory, normalization))


@torch.inference_mode()
def fit_memory_gain(model: DSKD, images: np.ndarray, device: torch.device, batch_size: int) -> None:
    """Set the memory's gain so its standardised map spreads on normal images as much as a
    student's fused map does (the mean of the students' spreads; docs/design.md §2): then no
    member outweighs the others merely by its scale. 1 without students."""
    assert model.memory is not None
    model.eval()
    model.memory.gain.fill_(1.0)
    if not model.config.has_students:
        return
    members: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        batch = model.members(images_to_tensor(images[start : start + batch_size], device))
        found = [moments(m) for m in batch]
        members = found if not members else [a + b for a, b in zip(members, found, strict=True)]
    spreads = [spread_from_moments(m, "standardize") for m in members]
    target = sum(spreads[:-1]) / len(spreads[:-1])
    model.memory.gain.fill_(target / spreads[-1])


BASELINE_IMAGES = 256  # training images the per-pixel baseline is the mean over, at most


def baseline_sample(n: int, max_images: int = BASELINE_IMAGES) -> np.ndarray:
    """Indices of at most `max_images` of n training images, evenly spaced, for the baseline."""
    return np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int))


@torch.inference_mode()
def fit_pixel_baseline(
    model: DSKD,
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    batch_size: int,
    max_images: int = BASELINE_IMAGES,
) -> None:
    """Set model.pixel_baseline to the per-pixel mean map of (at most `max_images` of) `images`.

    Training images, not the hold-out: the threshold is then fitted on images the baseline has
    not seen. Their maps run a little lower than unseen normals', evenly, which a divisor's
    shape does not mind. A floor keeps near-zero pixels from blowing up the ratio.
    """
    model.eval()
    n = len(images)
    if n == 0:
        return
    pick = baseline_sample(n, max_images)
    total = torch.zeros_like(model.pixel_baseline, dtype=torch.float64)
    for start in range(0, len(pick), batch_size):
        batch = np.asarray(images[pick[start : start + batch_size]])
        maps, _ = model.predict(images_to_tensor(batch, device), remove_baseline=False)
        total += maps.double().sum(dim=0)
    mean = (total / len(pick)).float()
    # A divisor needs a floor; a subtrahend does not.
    divisor = model.config.map_baseline == "mean"
    model.pixel_baseline.copy_(baseline_from_mean(mean) if divisor else mean)


def model_rows(images: np.ndarray | list[np.ndarray], config: DSKDConfig) -> np.ndarray:
    """What the network sees of `images`: themselves, or, tiled, all their tiles."""
    if not config.tiled:
        return np.asarray(images)
    size, overlap = config.image_size, config.tile_overlap
    return np.concatenate([tiling.cut(image, size, overlap)[0] for image in images])


def calibrate(
    model: DSKD,
    train_images: np.ndarray | torch.Tensor,
    holdout: np.ndarray | list[np.ndarray],
    config: DSKDConfig,
    device: torch.device,
) -> tuple[Threshold | None, dict[str, Any]]:
    """After training: level statistics, then the memory's gain, then the memory's weight, then
    the per-pixel baseline, then the threshold, each on the maps the previous step leaves, so
    the checkpoint scores exactly as it was calibrated. Returns the threshold and what the
    checkpoint's meta keeps of the calibration (the weight's choice).

    `train_images` are model inputs (tiles, for a tiled model); `holdout` whole images (full
    resolution, for a tiled model: the threshold is a quantile of stitched maps' scores).

    Level statistics come from the held-out normal images (training images' maps run low: the
    students have seen them); without a hold-out, from `train_images` (which `fit` gives as the
    baseline's sample of the training images: `baseline_sample`).
    """
    normal = model_rows(holdout, config) if len(holdout) else np.asarray(train_images)
    if config.level_normalization != "none":
        fit_level_statistics(model, normal, device, config.batch_size)
    meta: dict[str, Any] = {}
    if model.memory is not None:
        fit_memory_gain(model, normal, device, config.batch_size)
        if config.has_students and config.memory_weight_fit == "synthetic":
            if len(holdout) >= MIN_HELD_OUT:
                meta["memory_weight"] = fit_memory_weight(
                    model, normal, train_images, device, config.batch_size
                ) | {"held_out": len(holdout)}
            else:
                log.warning(
                    "%d held-out normal image(s), too few to pick the memory's weight from "
                    "(%d at least): it stays %s",
                    len(holdout), MIN_HELD_OUT, config.memory_weight,
                )  # fmt: skip
    if config.map_baseline != "none":
        fit_pixel_baseline(model, train_images, device, config.batch_size)
    return compute_threshold(model, holdout, config, device), meta


def compute_threshold(
    model: DSKD, holdout: np.ndarray | list[np.ndarray], config: DSKDConfig, device: torch.device
) -> Threshold | None:
    """The high quantile of held-out normal images' scores (docs/design.md §3); None without
    a hold-out. An image is anomalous when its score is above it (`metrics.is_anomalous`)."""
    if len(holdout) == 0:
        log.warning("no held-out normal images: the checkpoint will have no image threshold")
        return None
    scores = image_scores(model, holdout, device, config.batch_size)
    value = float(np.quantile(scores, config.threshold_quantile))
    return Threshold(value, "quantile", config.threshold_quantile, [float(s) for s in scores])
