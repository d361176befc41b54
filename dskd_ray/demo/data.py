"""The built-in demo data set: synthetic textures and a part with realistic defects (MVTec layout).

`make_demo_data(root)` writes, for each category, ``train/good``, ``test/good``, ``test/<defect>``
and ``ground_truth/<defect>/<stem>_mask.png`` (docs/design.md §4), so every command of the
library can be tried without downloading MVTec AD. The categories:

- ``woven``: a plain-weave fabric; defects ``cut``, ``stain``, ``hole``, ``thread``.
- ``brushed_metal``: grey brushed steel; defects ``scratch``, ``dent``, ``contamination``.
- ``washer``: a turned steel tab washer on a cloth; defects ``crack``, ``chip``, ``pit``.

Normal images vary (thread phase and thickness, brushing direction, part position and rotation,
lighting, sensor noise), so a model has to learn the texture rather than a fixed picture. Each
defect is painted only through its mask, so a mask covers exactly the pixels that differ from the
defect-free image; defect contrast is drawn at random, from barely visible to obvious.

Every image has its own random generator seeded from (seed, category, split, index): files are
byte-identical for a given seed, and adding a category or changing a count leaves the other images
unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dskd_ray.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_CATEGORIES",
    "DEMO_DEFECTS",
    "DemoSample",
    "make_demo_data",
    "render_sample",
]


# ----------------------------------------------------------------------------------------------
# Shared drawing tools. Images are float (H, W, 3) in [0, 1] until they are written.


@dataclass
class _Scene:
    """A defect-free image and what its defects need to know about how it was made."""

    image: np.ndarray  # (H, W, 3) float, the normal image
    backdrop: np.ndarray  # (H, W, 3) float, what shows where material is missing
    surface: np.ndarray  # (H, W) bool, where a defect may start
    extra: dict[str, Any] = field(default_factory=dict)  # geometry and layers a defect reuses

    @property
    def size(self) -> int:
        return self.image.shape[0]


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


@lru_cache(maxsize=8)
def _frequencies(size: int) -> tuple[np.ndarray, np.ndarray]:
    fy = np.fft.fftfreq(size).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(size).astype(np.float32)[None, :]
    return fy, fx


def _gaussian_gain(size: int, sigma_along: float, sigma_across: float, angle: float) -> np.ndarray:
    """Fourier transfer function of a Gaussian blur, stretched along the direction ``angle``."""
    fy, fx = _frequencies(size)
    c, s = math.cos(angle), math.sin(angle)
    f_along = (sigma_along * c) * fx + (sigma_along * s) * fy
    f_across = (-sigma_across * s) * fx + (sigma_across * c) * fy
    return np.exp(np.float32(-2 * math.pi**2) * (f_along**2 + f_across**2))


def _noise(
    rng: np.random.Generator,
    size: int,
    sigma_along: float,
    sigma_across: float | None = None,
    angle: float = 0.0,
) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise; anisotropic gives streaks along ``angle``.

    Filtering in the Fourier domain costs the same for any sigma, which keeps long brush streaks
    cheap; the wrap-around it implies is invisible in noise.
    """
    across = sigma_along if sigma_across is None else sigma_across
    # Uniform white noise is cheaper to draw and the blur makes it Gaussian all the same.
    white = rng.random((size, size), dtype=np.float32)
    gain = _gaussian_gain(size, sigma_along, across, angle)
    out = np.fft.irfft2(np.fft.rfft2(white) * gain, s=(size, size))
    out -= out.mean()
    return out / (out.std() + 1e-12)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    gain = _gaussian_gain(image.shape[0], sigma, sigma, 0.0)
    return np.fft.irfft2(np.fft.rfft2(image) * gain, s=image.shape)


def _illumination(
    rng: np.random.Generator, size: int, gradient: float, blotch: float
) -> np.ndarray:
    """A multiplicative light field: a linear fall-off in a random direction and broad patches."""
    yy, xx = _grid(size)
    a = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(a) + yy * math.sin(a)) / size * gradient * rng.uniform(0.4, 1.0)
    ramp -= ramp.mean()
    return 1.0 + ramp + blotch * _noise(rng, size, size / 5)


def _rgb(*values: float) -> np.ndarray:
    # float32 throughout: half the memory traffic, and NumPy keeps float32 only if every array is.
    return np.array(values, dtype=np.float32)


def _jitter(rng: np.random.Generator, spread: float, n: int = 3) -> np.ndarray:
    """Per-channel factors around 1: a slightly different dye lot or white balance per image."""
    return rng.uniform(1 - spread, 1 + spread, n).astype(np.float32)


def _sensor_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    # Uniform noise of the same std looks the same after quantisation and draws ~10x faster.
    return (rng.random((size, size, 3), dtype=np.float32) - 0.5) * (sigma * math.sqrt(12))


def _random_path(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    length: float,
    step: float,
    turn: float,
) -> np.ndarray:
    """(N, 2) x, y points of a random walk whose heading drifts by ``turn`` radians a step."""
    n = max(2, int(length / step))
    headings = heading + np.cumsum(rng.normal(0.0, turn, n))
    steps = step * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    return start + np.vstack([np.zeros((1, 2)), np.cumsum(steps, axis=0)])


def _draw_paths(size: int, paths: Sequence[np.ndarray], width: int) -> np.ndarray:
    """Rasterise polylines into a bool mask; PIL draws hard edges, so the mask is exact."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for path in paths:
        draw.line([(float(x), float(y)) for x, y in path], fill=255, width=width, joint="curve")
    return np.asarray(canvas) > 0


def _blob(
    rng: np.random.Generator,
    size: int,
    centre: np.ndarray,
    radius: float,
    roughness: float,
    grain: np.ndarray | None = None,
) -> np.ndarray:
    """Signed field of an irregular elliptical blob: > 0 inside, about 1 at its centre.

    ``grain`` replaces the default isotropic wobble of the outline (a woven hole frays along the
    threads, for instance).
    """
    yy, xx = _grid(size)
    angle = rng.uniform(0, math.pi)
    aspect = rng.uniform(0.55, 1.0)
    dx, dy = xx - float(centre[0]), yy - float(centre[1])
    along = dx * math.cos(angle) + dy * math.sin(angle)
    across = (-dx * math.sin(angle) + dy * math.cos(angle)) / aspect
    distance = np.hypot(along, across) / radius
    wobble = _noise(rng, size, max(1.0, radius / 3)) if grain is None else grain
    return 1.0 - distance + roughness * wobble


def _point_in(rng: np.random.Generator, allowed: np.ndarray, margin: int = 0) -> np.ndarray:
    """A random (x, y) inside ``allowed``, at least ``margin`` pixels from the image border."""
    size = allowed.shape[0]
    inner = np.zeros_like(allowed)
    inner[margin : size - margin, margin : size - margin] = True
    ys, xs = np.nonzero(allowed & inner)
    if len(ys) == 0:
        ys, xs = np.nonzero(allowed)
    k = rng.integers(len(ys))
    return np.array([xs[k], ys[k]], dtype=np.float64) + rng.uniform(-0.5, 0.5, 2)


# ----------------------------------------------------------------------------------------------
# woven: a plain-weave fabric


def _render_woven(rng: np.random.Generator, size: int) -> _Scene:
    scale = size / 256
    yy, xx = _grid(size)
    period = max(4.0, 11.0 * scale) * rng.uniform(0.96, 1.04)
    angle = math.radians(rng.uniform(-2.5, 2.5))
    c, s = math.cos(angle), math.sin(angle)
    # Threads are never ruler-straight: a slow wander of the weave coordinates.
    wander = 0.06 * _noise(rng, size, 20 * scale)
    u = (xx * c + yy * s) / period + rng.uniform(0, 1) + wander
    v = (-xx * s + yy * c) / period + rng.uniform(0, 1) - wander
    fu, fv = u - np.floor(u), v - np.floor(v)  # position across a warp / weft thread, 0..1
    i, j = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    i -= i.min()
    j -= j.min()

    # Each thread has its own thickness and dye lot.
    warp_width = np.clip(rng.normal(0.80, 0.06, i.max() + 1), 0.6, 0.95).astype(np.float32)[i]
    weft_width = np.clip(rng.normal(0.80, 0.06, j.max() + 1), 0.6, 0.95).astype(np.float32)[j]
    warp_tone = rng.normal(1.0, 0.04, i.max() + 1).astype(np.float32)[i]
    weft_tone = rng.normal(1.0, 0.04, j.max() + 1).astype(np.float32)[j]
    # 1 on a thread's axis, 0 at its edges and in the gaps between threads
    warp_cover = np.clip(1 - ((fu - 0.5) / (warp_width / 2)) ** 2, 0, 1)
    weft_cover = np.clip(1 - ((fv - 0.5) / (weft_width / 2)) ** 2, 0, 1)
    # Fibres run along each thread: streaky noise in the thread's own direction.
    warp_fibre = 1 + 0.10 * _noise(rng, size, 5 * scale, 0.6, angle + math.pi / 2)
    weft_fibre = 1 + 0.10 * _noise(rng, size, 5 * scale, 0.6, angle)
    # A thread on top rises over the crossing and dives under its neighbours at the cell ends.
    warp_shade = np.sqrt(warp_cover) * (0.55 + 0.45 * np.sin(math.pi * fv)) * warp_tone * warp_fibre
    weft_shade = np.sqrt(weft_cover) * (0.55 + 0.45 * np.sin(math.pi * fu)) * weft_tone * weft_fibre

    warp_on_top = (i + j) % 2 == 0
    warp_rgb = _rgb(0.80, 0.72, 0.58) * rng.uniform(0.92, 1.08) * _jitter(rng, 0.025)
    weft_rgb = warp_rgb * rng.uniform(0.86, 0.96) * _jitter(rng, 0.015)
    palette = np.stack([warp_rgb, weft_rgb, warp_rgb * 0.22])  # warp, weft, backing in the gaps
    # Which layer each pixel sees: the top thread, else the one under it (in the top one's
    # shadow), else the backing. Working on scalar maps and one palette lookup keeps it cheap.
    top_cover = np.where(warp_on_top, warp_cover, weft_cover)
    under_cover = np.where(warp_on_top, weft_cover, warp_cover)
    top_shade = 0.2 + 0.8 * np.where(warp_on_top, warp_shade, weft_shade)
    under_shade = 0.6 * (0.2 + 0.8 * np.where(warp_on_top, weft_shade, warp_shade))
    on_top, on_under = top_cover > 0, (top_cover <= 0) & (under_cover > 0)
    shade = np.where(on_top, top_shade, np.where(on_under, under_shade, np.float32(1.0)))
    warp_seen = (on_top & warp_on_top) | (on_under & ~warp_on_top)
    colour = np.where(warp_seen, 0, np.where(on_top | on_under, 1, 2))

    light = _illumination(rng, size, gradient=0.25, blotch=0.04)
    grain = _sensor_noise(rng, size, 0.012)
    image = palette[colour] * (shade * light)[..., None] + grain
    # Through a hole one sees whatever the cloth lies on, from near black to as light as the
    # gaps in the weave, so a hole is not simply the darkest thing in the picture.
    table = rng.uniform(0.04, 0.3) * (1 + 0.15 * _noise(rng, size, 3 * scale))
    backdrop = (table * light)[..., None] * _jitter(rng, 0.08) + 0.8 * grain[::-1]
    return _Scene(
        image=image,
        backdrop=backdrop,
        surface=np.ones((size, size), dtype=bool),
        extra={
            "period": period,
            "angle": angle,
            "thread_rgb": warp_rgb,
            "light": light,
            "threads": {"warp": (warp_cover, i), "weft": (weft_cover, j)},
        },
    )


def _woven_cut(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size, period = scene.size, scene.extra["period"]
    start = _point_in(rng, scene.surface, margin=size // 8)
    path = _random_path(
        rng, start, rng.uniform(0, 2 * math.pi), rng.uniform(0.12, 0.4) * size, 2.0, 0.06
    )
    width = int(rng.integers(1, max(2, round(0.45 * period)) + 1))
    mask = _draw_paths(size, [path], width)
    # Severed threads open a gap; how far it gapes sets the contrast.
    opening = rng.uniform(0.35, 1.0)
    return scene.image * (1 - opening) + scene.backdrop * opening, mask


_STAIN_TINTS = np.array(
    [
        [0.72, 0.52, 0.32],  # coffee
        [0.85, 0.48, 0.30],  # rust
        [0.55, 0.60, 0.82],  # ink
        [0.62, 0.62, 0.60],  # oil
        [0.70, 0.80, 0.55],  # grass
    ],
    dtype=np.float32,
)


def _woven_stain(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.size
    radius = rng.uniform(0.035, 0.1) * size
    centre = _point_in(rng, scene.surface, margin=int(radius))
    shape = _blob(rng, size, centre, radius, roughness=0.3)
    mask = shape > 0
    strength = rng.uniform(0.2, 1.0)
    # Densest in the middle and fading outwards, but never to nothing: the mask's rim is stained.
    alpha = strength * (0.35 + 0.65 * np.clip(shape / 0.3, 0, 1))
    tint = _STAIN_TINTS[rng.integers(len(_STAIN_TINTS))] * _jitter(rng, 0.1)
    return scene.image * (1 - alpha[..., None] * (1 - tint)), mask


def _woven_hole(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size, period, angle = scene.size, scene.extra["period"], scene.extra["angle"]
    radius = rng.uniform(0.025, 0.075) * size
    centre = _point_in(rng, scene.surface, margin=int(radius))
    # Broken threads pull out along their own direction, so the edge frays along the weave.
    loose = "warp" if rng.random() < 0.5 else "weft"
    direction = angle + (math.pi / 2 if loose == "warp" else 0.0)
    frayed = _noise(rng, size, 1.5 * period, 0.5 * period, direction)
    shape = _blob(rng, size, centre, radius, roughness=0.35, grain=frayed)
    mask = shape > 0
    # Cut ends of those threads hang into the hole, each to its own depth, sagging into shadow.
    cover, index = scene.extra["threads"][loose]
    reach = rng.uniform(0.0, 0.6, index.max() + 1).astype(np.float32)[index]
    stub = mask & (cover > 0.25) & (shape < reach * shape.max())
    return np.where(stub[..., None], scene.image * 0.7, scene.backdrop), mask


def _woven_thread(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A loose thread lying across the weave."""
    size, period = scene.size, scene.extra["period"]
    start = _point_in(rng, scene.surface, margin=size // 8)
    path = _random_path(
        rng, start, rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.5) * size, 2.0, 0.1
    )
    width = max(1, round(rng.uniform(0.35, 0.65) * period))
    mask = _draw_paths(size, [path], width)
    # Round cross-section: brightest on the axis of the drawn stroke.
    axis = _blur(mask.astype(np.float32), max(0.5, width / 3))
    roundness = np.clip(axis / (axis[mask].max() + 1e-9), 0, 1)
    rgb = scene.extra["thread_rgb"] * rng.uniform(0.8, 1.15) * _jitter(rng, 0.05)
    fibre = 1 + 0.08 * _noise(rng, size, 1.0)
    shade = (0.5 + 0.5 * roundness) * fibre * scene.extra["light"]
    return rgb * shade[..., None] + _sensor_noise(rng, size, 0.012), mask


# ----------------------------------------------------------------------------------------------
# brushed_metal: grey brushed steel, grey-looking but stored RGB


def _render_brushed_metal(rng: np.random.Generator, size: int) -> _Scene:
    scale = size / 256
    yy, xx = _grid(size)
    angle = math.radians(rng.uniform(-4, 4))
    # Fine lines from the brush bristles and broader, fainter bands from the pad.
    fine = _noise(rng, size, 30 * scale, 0.5, angle)
    coarse = _noise(rng, size, 90 * scale, 2.5 * scale, angle)
    grain = 1 + 0.05 * fine + 0.035 * coarse
    # The brushed lay scatters light into a band across the brushing direction.
    across = (-(xx - size / 2) * math.sin(angle) + (yy - size / 2) * math.cos(angle)) / size
    band_at, band_width = rng.uniform(-0.35, 0.35), rng.uniform(0.2, 0.45)
    band = rng.uniform(0.06, 0.2) * np.exp(-(((across - band_at) / band_width) ** 2))
    light = _illumination(rng, size, gradient=0.15, blotch=0.025) + band
    smooth = rng.uniform(0.48, 0.62) * light
    tint = _rgb(0.98, 1.0, 1.03) * _jitter(rng, 0.01)
    image = (smooth * grain)[..., None] * tint + _sensor_noise(rng, size, 0.01)
    return _Scene(
        image=image,
        backdrop=np.zeros_like(image),
        surface=np.ones((size, size), dtype=bool),
        extra={"smooth": smooth, "grain": grain, "tint": tint},
    )


def _metal_scratch(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.size
    start = _point_in(rng, scene.surface, margin=size // 10)
    # A scratch is a smooth arc: a steady bend plus a little wobble of the heading.
    length = rng.uniform(0.1, 0.5) * size
    step = 2.0
    n = max(2, int(length / step))
    headings = (
        rng.uniform(0, 2 * math.pi)
        + rng.normal(0.0, 0.02) * np.arange(n)
        + np.cumsum(rng.normal(0.0, 0.015, n))
    )
    steps = step * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    path = start + np.vstack([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    width = int(rng.integers(1, max(2, round(2 * size / 256)) + 1))
    mask = _draw_paths(size, [path], width)
    # Bright where the groove catches the light, dark where it does not; depth varies along it.
    polarity = 1.0 if rng.random() < 0.5 else -1.0
    contrast = rng.uniform(0.08, 0.4)
    along = 0.5 + 0.5 * np.clip(0.5 + 0.3 * _noise(rng, size, 8 * size / 256), 0, 1)  # in 0.5..1
    return scene.image * (1 + polarity * contrast * along)[..., None], mask


def _metal_dent(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.size
    yy, xx = _grid(size)
    a = rng.uniform(0.02, 0.07) * size
    b = a * rng.uniform(0.6, 1.0)
    centre = _point_in(rng, scene.surface, margin=int(a) + 2)
    tilt = rng.uniform(0, math.pi)
    dx, dy = xx - float(centre[0]), yy - float(centre[1])
    along = dx * math.cos(tilt) + dy * math.sin(tilt)
    across = -dx * math.sin(tilt) + dy * math.cos(tilt)
    rho2 = (along / a) ** 2 + (across / b) ** 2
    mask = rho2 < 1
    # Shade the dent as a smooth bowl lit from one side.
    depth = np.where(mask, (1 - rho2) ** 2, 0.0)
    gy, gx = np.gradient(depth)
    light = rng.uniform(0, 2 * math.pi)
    # The bowl's steepest slope is 1.54 / a (at rho = 1/sqrt 3); dividing keeps shading in [-1, 1].
    shading = -(gx * math.cos(light) + gy * math.sin(light)) * a / 1.54
    strength = rng.uniform(0.15, 0.6)
    # Pressing the metal smears the brush lines into a matte, isotropic finish.
    matte = 1 + 0.04 * _noise(rng, size, 1.0)
    smear = rng.uniform(0.3, 0.9) * np.sqrt(np.clip(1 - rho2, 0, 1)) + 0.1
    grain = scene.extra["grain"] * (1 - smear) + matte * smear
    gray = scene.extra["smooth"] * (1 + strength * shading) * grain
    return gray[..., None] * scene.extra["tint"] + _sensor_noise(rng, size, 0.01), mask


_PARTICLE_RGB = np.array(
    [
        [0.10, 0.08, 0.07],  # soot
        [0.35, 0.20, 0.10],  # rust
        [0.22, 0.20, 0.16],  # grease
        [0.85, 0.83, 0.78],  # dust
    ],
    dtype=np.float32,
)


def _metal_contamination(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.size
    scale = size / 256
    yy, xx = _grid(size)
    count = int(rng.integers(1, 13))
    spread = rng.uniform(0.01, 0.06) * size
    centre = _point_in(rng, scene.surface, margin=int(spread) + 4)
    centres = (centre + rng.normal(0.0, spread, (count, 2))).astype(np.float32)
    radii = (rng.uniform(0.8, 4.5, count) * max(scale, 0.5)).astype(np.float32)
    wobble = _noise(rng, size, 1.2)
    distance = np.hypot(xx - centres[:, 0, None, None], yy - centres[:, 1, None, None])
    fields = 1.0 - distance / radii[:, None, None] + 0.4 * wobble
    mask = (fields > 0).any(axis=0)
    colour = _PARTICLE_RGB[rng.integers(len(_PARTICLE_RGB))] * rng.uniform(0.85, 1.15)
    opacity = rng.uniform(0.35, 0.95)
    # Thicker towards a particle's middle.
    alpha = opacity * (0.5 + 0.5 * np.clip(fields.max(axis=0) / 0.5, 0, 1))
    return scene.image * (1 - alpha[..., None]) + colour * alpha[..., None], mask


# ----------------------------------------------------------------------------------------------
# washer: a turned steel tab washer on a dark cloth


def _render_washer(rng: np.random.Generator, size: int) -> _Scene:
    scale = size / 256
    yy, xx = _grid(size)
    cx, cy = (float(c) for c in size / 2 + rng.uniform(-0.03, 0.03, 2) * size)
    r_out = 0.37 * size * rng.uniform(0.99, 1.01)
    r_in = 0.15 * size * rng.uniform(0.985, 1.015)
    rotation = math.radians(rng.uniform(-8, 8))
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    # Soft (half-pixel) edges, so the outline is not jagged.
    ring = np.clip(r_out - r + 0.5, 0, 1) * np.clip(r - r_in + 0.5, 0, 1)
    # The key tab reaching into the bore, pointing up: it makes the rotation visible.
    tab_dir = -math.pi / 2 + rotation
    radial = dx * math.cos(tab_dir) + dy * math.sin(tab_dir)
    lateral = -dx * math.sin(tab_dir) + dy * math.cos(tab_dir)
    tab_half_width, tab_depth = 0.03 * size, 0.045 * size
    tab = np.clip(tab_half_width - np.abs(lateral) + 0.5, 0, 1) * np.clip(
        radial - (r_in - tab_depth) + 0.5, 0, 1
    )
    tab *= radial > 0
    cover = np.maximum(ring, np.minimum(tab, (r < r_in + 1).astype(np.float32)))

    # Background: matte cloth, with the washer's soft shadow towards the bottom right.
    cloth = rng.uniform(0.15, 0.24) * (1 + 0.07 * _noise(rng, size, 0.8 * scale))
    cloth_rgb = _rgb(0.92, 0.97, 1.08) * _jitter(rng, 0.03)
    light = _illumination(rng, size, gradient=0.3, blotch=0.04)
    shift = (int(round(4 * scale)), int(round(3 * scale)))
    shadow = _blur(np.roll(cover, shift, axis=(0, 1)), 5 * scale + 0.5)
    background = (cloth * light * (1 - 0.45 * shadow))[..., None] * cloth_rgb

    # The chamfers at both edges tilt towards or away from a light at the top left.
    bevel = 0.035 * size
    facing = np.cos(theta - (-3 * math.pi / 4))
    outer = 1 - np.clip((r_out - r) / bevel, 0, 1)
    inner = 1 - np.clip((r - r_in) / bevel, 0, 1)
    chamfer = 1 + 0.45 * (outer - inner) * facing
    # A lathe-turned face: concentric tool marks and a bow-tie sheen turning with the part.
    marks = np.convolve(rng.standard_normal(size + 2), np.ones(2) / 2, mode="same")
    tool_marks = marks.astype(np.float32)[np.minimum((r * 2).astype(np.int64), size + 1)]
    sheen = 1 + rng.uniform(0.1, 0.2) * np.cos(2 * (theta - rotation - rng.uniform(-0.1, 0.1)))
    finish = 1 + 0.035 * tool_marks + 0.02 * _noise(rng, size, 0.7)
    steel = _rgb(0.72, 0.72, 0.74) * rng.uniform(0.96, 1.04) * _jitter(rng, 0.02)
    metal = (chamfer * sheen * finish * light)[..., None] * steel

    mix = cover[..., None]
    grain = _sensor_noise(rng, size, 0.01)
    image = metal * mix + background * (1 - mix) + grain
    backdrop = background + grain[::-1]
    face = (cover > 0.99) & (r > r_in + bevel) & (r < r_out - bevel)
    return _Scene(
        image=image,
        backdrop=backdrop,
        surface=face,
        extra={"cover": cover, "centre": np.array([cx, cy]), "r_in": r_in, "r_out": r_out},
    )


def _washer_crack(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.size
    start = _point_in(rng, scene.surface)
    centre = scene.extra["centre"]
    radial = math.atan2(start[1] - centre[1], start[0] - centre[0])
    heading = radial + rng.choice([0.0, math.pi]) + rng.normal(0, 0.4)
    length = rng.uniform(0.08, 0.3) * size
    step = 1.5 * max(size / 256, 0.5)
    trunk = _random_path(rng, start, heading, length, step, 0.3)
    paths = [trunk]
    # Side cracks split off the trunk at a sharp angle.
    for _ in range(int(rng.integers(0, 4))):
        at = trunk[int(rng.integers(len(trunk) // 4, len(trunk)))]
        side = heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1)
        paths.append(_random_path(rng, at, side, length * rng.uniform(0.2, 0.5), step, 0.3))
    width = 2 if size >= 192 and rng.random() < 0.35 else 1
    mask = _draw_paths(size, paths, width) & (scene.extra["cover"] > 0.5)
    darkness = rng.uniform(0.2, 0.8)
    return scene.image * (1 - darkness), mask


def _washer_chip(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.size
    cover = scene.extra["cover"]
    radius = rng.uniform(0.03, 0.075) * size
    # Knocked off the outer rim, now and then off the bore's edge.
    on_outer = rng.random() < 0.8
    edge = scene.extra["r_out"] if on_outer else scene.extra["r_in"]
    at = rng.uniform(-math.pi, math.pi)
    reach = edge + (1 if on_outer else -1) * rng.uniform(0.0, 0.5) * radius
    centre_xy = np.array([math.cos(at), math.sin(at)]) * reach + scene.extra["centre"]
    missing = _blob(rng, size, centre_xy, radius, roughness=0.25) > 0
    # The fresh fracture face next to the gap catches the light differently.
    near = _blur(missing.astype(np.float32), 1.0) > 0.05
    fracture = near & ~missing & (cover > 0.5)
    gone = missing & (cover > 0.02)
    glint = rng.uniform(0.55, 0.8) if rng.random() < 0.5 else rng.uniform(1.2, 1.5)
    painted = np.where(gone[..., None], scene.backdrop, scene.image * glint)
    return painted, gone | fracture


def _washer_pit(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = scene.size
    scale = size / 256
    yy, xx = _grid(size)
    count = int(rng.integers(1, 4))
    first = _point_in(rng, scene.surface)
    centres = (first + rng.normal(0.0, 0.04 * size, (count, 2))).astype(np.float32)
    radii = (rng.uniform(1.5, 6.0, count) * max(scale, 0.4)).astype(np.float32)
    dx = xx - centres[:, 0, None, None]  # (K, H, W)
    dy = yy - centres[:, 1, None, None]
    rhos = np.hypot(dx, dy) / radii[:, None, None]
    nearest = np.argmin(rhos, axis=0)[None]
    rho = np.take_along_axis(rhos, nearest, axis=0)[0]
    mask = (rho < 1) & (scene.extra["cover"] > 0.99)
    # Darkest at the bottom; the far wall of each pit faces the light and shows a crescent.
    depth = rng.uniform(0.2, 0.85)
    light = rng.uniform(0, 2 * math.pi)
    bearing = np.arctan2(
        np.take_along_axis(dy, nearest, 0)[0], np.take_along_axis(dx, nearest, 0)[0]
    )
    wall = np.cos(bearing - light)
    factor = 1 - depth * (1 - 0.6 * rho**2) + 0.25 * depth * rho**2 * wall
    return scene.image * factor[..., None], mask


# ----------------------------------------------------------------------------------------------
# Registry and public API

Renderer = Callable[[np.random.Generator, int], _Scene]
DefectPainter = Callable[[_Scene, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class _CategorySpec:
    render: Renderer
    defects: dict[str, DefectPainter]


_CATEGORIES: dict[str, _CategorySpec] = {
    "woven": _CategorySpec(
        _render_woven,
        {"cut": _woven_cut, "stain": _woven_stain, "hole": _woven_hole, "thread": _woven_thread},
    ),
    "brushed_metal": _CategorySpec(
        _render_brushed_metal,
        {"scratch": _metal_scratch, "dent": _metal_dent, "contamination": _metal_contamination},
    ),
    "washer": _CategorySpec(
        _render_washer,
        {"crack": _washer_crack, "chip": _washer_chip, "pit": _washer_pit},
    ),
}

DEMO_CATEGORIES: tuple[str, ...] = tuple(_CATEGORIES)
DEMO_DEFECTS: dict[str, tuple[str, ...]] = {
    name: tuple(spec.defects) for name, spec in _CATEGORIES.items()
}

_MIN_IMAGE_SIZE = 32
_MAX_DEFECT_TRIES = 20


@dataclass(frozen=True)
class DemoSample:
    """One generated image, with its mask and the same image without the defect."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, all False for a normal image
    reference: np.ndarray  # (H, W, 3) uint8, the defect-free image it was painted on


def _stable_id(name: str) -> int:
    # Python's hash() is salted per process; crc32 is the same everywhere.
    return zlib.crc32(name.encode("utf-8"))


def _rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _stable_id(category), _stable_id(split), index])


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def render_sample(
    category: str,
    defect: str | None = None,
    *,
    seed: int = 0,
    split: str | None = None,
    index: int = 0,
    image_size: int = 256,
    defect_window: int | None = None,
) -> DemoSample:
    """Render one demo image in memory: the image `make_demo_data` writes for the same arguments.

    ``defect=None`` gives a normal image; ``split`` defaults to ``test/<defect>`` or ``train/good``.
    ``defect_window=W`` paints the defect as if the image were W pixels wide, in a random W×W
    window of it: at image_size 1024 and W 256, a defect a sixteenth of the usual size (the
    small defects on large images that tiling is for; textures only).
    """
    _check_args([category], seed, image_size)
    spec = _CATEGORIES[category]
    if defect is not None and defect not in spec.defects:
        raise ConfigError(
            f"unknown defect {defect!r} for {category!r}; choose from {', '.join(spec.defects)}"
        )
    if split is None:
        split = "train/good" if defect is None else f"test/{defect}"
    rng = _rng(seed, category, split, index)
    scene = spec.render(rng, image_size)
    reference = _to_uint8(scene.image)
    if defect is None:
        return DemoSample(reference, np.zeros(reference.shape[:2], dtype=bool), reference)

    window = image_size if defect_window is None else defect_window
    if not _MIN_IMAGE_SIZE <= window <= image_size:
        raise ConfigError(
            f"defect_window must be from {_MIN_IMAGE_SIZE} to the image size ({image_size}), "
            f"got {window}"
        )
    if window < image_size and category not in _WINDOWED:
        raise ConfigError(
            f"defect_window works on the textures ({', '.join(_WINDOWED)}), not {category!r}"
        )
    top = left = 0
    if window < image_size:  # drawn only then: the default images stay byte-identical
        top, left = (int(v) for v in rng.integers(0, image_size - window + 1, 2))
    local = _crop(scene, top, left, window)
    min_area = max(3, window * window // 4000)
    for _ in range(_MAX_DEFECT_TRIES):
        painted, mask = spec.defects[defect](local, rng)
        if mask.sum() >= min_area:
            break
    else:  # pragma: no cover - each painter lands on its surface far more often than this
        raise RuntimeError(f"could not place a {defect!r} defect on a {category!r} image")
    if window < image_size:  # the defect, painted on its window, back in the whole image
        whole, full_mask = scene.image.copy(), np.zeros((image_size, image_size), bool)
        whole[top : top + window, left : left + window] = painted
        full_mask[top : top + window, left : left + window] = mask
        painted, mask = whole, full_mask
    # Painting only through the mask keeps every pixel outside it identical to the reference.
    image = np.where(mask[..., None], _to_uint8(painted), reference)
    return DemoSample(image, mask, reference)


# Categories whose scene is the same everywhere, so a window of it is a scene of its own (a
# washer's geometry — its centre and radii — is not).
_WINDOWED = ("woven", "brushed_metal")


def _crop(scene: _Scene, top: int, left: int, window: int) -> _Scene:
    """The window×window part of a scene at (top, left), with every per-pixel layer cut too."""
    size = scene.size
    if window == size:
        return scene

    def cut(value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.shape[:2] == (size, size):
            return value[top : top + window, left : left + window]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    return _Scene(
        image=cut(scene.image),
        backdrop=cut(scene.backdrop),
        surface=cut(scene.surface),
        extra=cut(scene.extra),
    )


def _check_args(categories: Sequence[str], seed: int, image_size: int) -> None:
    unknown = [c for c in categories if c not in _CATEGORIES]
    if unknown:
        raise ConfigError(
            f"unknown demo categor{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(map(repr, unknown))}; choose from {', '.join(DEMO_CATEGORIES)}"
        )
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if image.ndim == 2 else "RGB"
    # PNG written by Pillow carries no timestamp, so the bytes depend on the pixels only.
    # Level 1 is 3-5x faster than the default here and the noisy images barely compress anyway.
    Image.fromarray(image, mode=mode).save(path, format="PNG", compress_level=1)


def _write_category(
    folder: Path,
    category: str,
    seed: int,
    n_train: int,
    n_test_good: int,
    n_test_defect_per_type: int,
    image_size: int,
    defect_window: int | None = None,
) -> None:
    def stem(index: int, count: int) -> str:
        return f"{index:0{max(3, len(str(count - 1)))}d}"

    kw: dict[str, Any] = {"seed": seed, "image_size": image_size}
    for k in range(n_train):
        sample = render_sample(category, split="train/good", index=k, **kw)
        _save(sample.image, folder / "train" / "good" / f"{stem(k, n_train)}.png")
    for k in range(n_test_good):
        sample = render_sample(category, split="test/good", index=k, **kw)
        _save(sample.image, folder / "test" / "good" / f"{stem(k, n_test_good)}.png")
    for defect in DEMO_DEFECTS[category]:
        for k in range(n_test_defect_per_type):
            sample = render_sample(
                category, defect, split=f"test/{defect}", index=k, defect_window=defect_window, **kw
            )
            name = stem(k, n_test_defect_per_type)
            _save(sample.image, folder / "test" / defect / f"{name}.png")
            mask = np.where(sample.mask, 255, 0).astype(np.uint8)
            _save(mask, folder / "ground_truth" / defect / f"{name}_mask.png")


def make_demo_data(
    root: str | Path,
    categories: Sequence[str] | None = None,
    seed: int = 0,
    n_train: int = 60,
    n_test_good: int = 12,
    n_test_defect_per_type: int = 6,
    image_size: int = 256,
    overwrite: bool = False,
    defect_window: int | None = None,
) -> dict[str, Path]:
    """Write the demo data set in MVTec AD layout under ``root``; return category -> its folder.

    A category folder that exists and is not empty is left alone unless ``overwrite=True``, in
    which case it is replaced as a whole. Raises FileExistsError if one would be overwritten, and
    ConfigError for an unknown category or an invalid count or size.
    """
    chosen = list(dict.fromkeys(DEMO_CATEGORIES if categories is None else categories))
    _check_args(chosen, seed, image_size)
    if n_train < 1 or n_test_good < 0 or n_test_defect_per_type < 0:
        raise ConfigError(
            "n_train must be >= 1 and the test counts >= 0; got "
            f"n_train={n_train}, n_test_good={n_test_good}, "
            f"n_test_defect_per_type={n_test_defect_per_type}"
        )
    root = Path(root)
    folders = {name: root / name for name in chosen}
    # Check every category before writing any, so a refusal leaves nothing half-done.
    for folder in folders.values():
        in_use = folder.is_file() or (folder.is_dir() and any(folder.iterdir()))
        if in_use and not overwrite:
            raise FileExistsError(
                f"{folder} already exists and is not empty; pass overwrite=True "
                "(or --overwrite) to replace it, or choose another folder"
            )

    root.mkdir(parents=True, exist_ok=True)
    for name, folder in folders.items():
        # Build beside the target and swap it in, so an interrupted run never leaves a category
        # that looks complete but is not.
        staging = root / f".{name}.partial-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        try:
            _write_category(
                staging, name, seed, n_train, n_test_good, n_test_defect_per_type, image_size,
                defect_window,
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # nothing half-written is left behind
            raise
        if folder.is_dir():
            shutil.rmtree(folder)
        elif folder.exists():
            folder.unlink()
        staging.rename(folder)
        log.info("wrote demo category %s to %s", name, folder)
    return folders
