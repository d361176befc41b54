"""Heat-map overlays of anomaly maps on their images, for people to look at."""

from __future__ import annotations

import numpy as np
from PIL import Image

# A perceptually ordered blue → cyan → yellow → red ramp (a compact "turbo"-like map).
_STOPS = np.array(
    [
        [0.0, 48, 18, 59],
        [0.25, 40, 150, 240],
        [0.5, 100, 250, 120],
        [0.75, 250, 190, 40],
        [1.0, 200, 20, 10],
    ],
    dtype=np.float32,
)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] → (H, W, 3) uint8 colours."""
    v = np.clip(values, 0.0, 1.0)
    out = np.empty((*v.shape, 3), np.float32)
    for c in range(3):
        out[..., c] = np.interp(v, _STOPS[:, 0], _STOPS[:, c + 1])
    return out.astype(np.uint8)


def display_scale(amap: np.ndarray, threshold: float | None) -> np.ndarray:
    """Map values to [0, 1] for display: the image threshold sits at the middle of the ramp,
    so the colour means the same across images; without a threshold, per-image min–max."""
    if threshold is not None and threshold > 0:
        return amap / (2.0 * threshold)
    lo, hi = float(amap.min()), float(amap.max())
    return (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    threshold: float | None = None,
    alpha: float = 0.5,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Blend the coloured map over an (H, W, 3) uint8 image; optionally outline a mask in white."""
    if amap.shape != image.shape[:2]:
        resized = Image.fromarray(amap.astype(np.float32), mode="F").resize(
            (image.shape[1], image.shape[0]), Image.BILINEAR
        )
        amap = np.asarray(resized)
    heat = colorize(display_scale(amap, threshold)).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * heat
    out = np.clip(blended, 0, 255).astype(np.uint8)
    if mask is not None:
        if mask.shape != image.shape[:2]:
            m = Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (image.shape[1], image.shape[0]), Image.NEAREST
            )
            mask = np.asarray(m) > 127
        out[mask_outline(mask)] = (255, 255, 255)
    return out


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (4-neighbourhood), for drawing ground-truth outlines."""
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner
