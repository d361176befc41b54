"""Synthetic defects for denoising students (docs/design.md §3, `denoise`): DeSTSeg's idea.

A share of each training batch gets defects pasted in, made from the training images themselves
(no outside data set): a cut-paste patch from another image of the batch, another image blended
in through a Perlin-noise mask, or the image's own colours jittered inside a Perlin-noise mask.
The students see the corrupted image and are trained towards the teacher's features of the
clean one, so they learn not to reproduce anomalies.

Vectorised torch on the batch, on its device; every draw comes from one generator seeded by
(seed, epoch, step, rank), so a resumed run corrupts exactly the same pixels. Pure PyTorch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Kinds of defect, one drawn per corrupted image.
CUT_PASTE, PERLIN_BLEND, COLOUR_JITTER = 0, 1, 2
# Perlin lattice cells per side (per axis, drawn independently), as DRAEM draws 2^0…2^5 at 256².
PERLIN_RES: tuple[int, ...] = (2, 4, 8, 16)
PERLIN_THRESHOLD = 0.5  # noise above it is the defect (DRAEM's)
# Noise is computed on at most this many pixels a side and upsampled bilinearly: the finest
# lattice (16 cells) still spans 4 of them, and it is 16x cheaper at 256².
NOISE_SIZE = 64


def defect_generator(seed: int, epoch: int, step: int, rank: int, device: torch.device):  # noqa: ANN201
    """The torch.Generator for one training step's defects: a pure function of its key."""
    key = int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0])
    generator = torch.Generator(device=device)
    generator.manual_seed(key)
    return generator


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device)


def _randint(generator: torch.Generator, high: int, *shape: int) -> torch.Tensor:
    return torch.randint(high, shape, generator=generator, device=generator.device)


def perlin_noise(
    n: int, size: int, res_y: int, res_x: int, generator: torch.Generator
) -> torch.Tensor:
    """(n, size, size) 2-D Perlin (gradient) noise with res_y × res_x lattice cells, in about
    [−1, 1]; size must be a multiple of both."""
    angles = 2 * math.pi * _rand(generator, n, res_y + 1, res_x + 1)
    gradients = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (n, ry+1, rx+1, 2)
    device = gradients.device
    ys = torch.arange(size, device=device, dtype=torch.float32) * res_y / size
    xs = torch.arange(size, device=device, dtype=torch.float32) * res_x / size
    iy, ix = ys.long(), xs.long()  # the cell of each pixel row / column
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]  # (S, 1), (1, S): position inside it

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[:, iy + dy][:, :, ix + dx]  # (n, S, S, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (t * 6 - 15) + 10)

    ty, tx = fade(fy), fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return math.sqrt(2) * torch.lerp(top, bottom, ty)


def perlin_masks(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, size, size) binary masks: Perlin noise above PERLIN_THRESHOLD, a lattice drawn per
    image and axis (the images of one lattice are made together), computed on at most
    NOISE_SIZE² pixels and upsampled."""
    small = min(size, NOISE_SIZE)
    options = [r for r in PERLIN_RES if small % r == 0]
    res = _randint(generator, len(options), n, 2).tolist()
    noise = torch.zeros(n, small, small, device=generator.device)
    for ry, rx in sorted({(a, b) for a, b in res}):
        rows = [i for i, (a, b) in enumerate(res) if (a, b) == (ry, rx)]
        noise[rows] = perlin_noise(len(rows), small, options[ry], options[rx], generator)
    if small != size:
        noise = F.interpolate(noise[:, None], size=(size, size), mode="bilinear")[:, 0]
    return (noise > PERLIN_THRESHOLD).float()


def rectangle_masks(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, size, size) binary masks of one rectangle each: 2–15% of the image, aspect ratio
    0.3–3.3, anywhere (CutPaste's patch)."""
    area = (0.02 + 0.13 * _rand(generator, n)) * size * size
    ratio = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * _rand(generator, n))
    h = (area * ratio).sqrt().clamp(2, size).long()
    w = (area / ratio).sqrt().clamp(2, size).long()
    top = (_rand(generator, n) * (size - h + 1)).long()
    left = (_rand(generator, n) * (size - w + 1)).long()
    coords = torch.arange(size, device=generator.device)
    inside_y = (coords[None] >= top[:, None]) & (coords[None] < (top + h)[:, None])  # (n, S)
    inside_x = (coords[None] >= left[:, None]) & (coords[None] < (left + w)[:, None])
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()


def shifted_partners(
    images: torch.Tensor, rows: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """For each of `rows`: another image of the batch (itself only in a batch of one), shifted
    cyclically by a random offset and flipped at random, so a patch comes from elsewhere."""
    b, _, size, _ = images.shape
    n = len(rows)
    partner = ((rows + 1 + _randint(generator, max(b - 1, 1), n)) % b).tolist()
    offset = _randint(generator, size, n, 2).tolist()
    flip = (_rand(generator, n, 2) < 0.5).tolist()
    # A loop of n copies: a roll and a flip are memory copies, several times faster here than
    # one gather with per-image index grids.
    out = []
    for i in range(n):
        source = images[partner[i]].roll(tuple(offset[i]), dims=(1, 2))
        axes = [axis for axis, f in zip((1, 2), flip[i], strict=True) if f]
        out.append(source.flip(axes) if axes else source)
    return torch.stack(out)  # (n, 3, S, S)


def colour_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, S, S) in [0, 1] with brightness, contrast and per-channel colour changed."""
    n = len(images)
    brightness = (_rand(generator, n, 1, 1, 1) - 0.5) * 0.6  # ±0.3
    contrast = 0.5 + _rand(generator, n, 1, 1, 1)  # 0.5–1.5
    colour = 0.7 + 0.6 * _rand(generator, n, 3, 1, 1)  # 0.7–1.3 per channel
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * contrast + mean + brightness) * colour


def synthesize_defects(
    images: torch.Tensor, share: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) RGB in [0, 1] → (the batch with defects in round(share·B) of its images,
    (B, S, S) masks of the changed pixels, zero for the images left clean).

    Each corrupted image gets one kind (uniformly): a cut-paste rectangle from another image,
    another image blended in through a Perlin mask (opacity 0.3–1), or its own colours jittered
    inside a Perlin mask. A Perlin mask that came out empty becomes a rectangle.
    """
    b, _, size, _ = images.shape
    out = images.clone()
    masks = torch.zeros(b, size, size, device=images.device)
    n = int(round(share * b))
    if n == 0:
        return out, masks
    rows = torch.randperm(b, generator=generator, device=generator.device)[:n].to(images.device)
    kind = _randint(generator, 3, n)
    perlin = perlin_masks(n, size, generator)
    rectangle = rectangle_masks(n, size, generator)
    empty = perlin.flatten(1).amax(dim=1) == 0
    mask = torch.where(((kind == CUT_PASTE) | empty)[:, None, None], rectangle, perlin)
    partners = shifted_partners(images, rows, generator)
    jittered = colour_jitter(images[rows], generator)
    opacity = torch.where(kind == PERLIN_BLEND, 0.3 + 0.7 * _rand(generator, n), 1.0)
    content = torch.where((kind == COLOUR_JITTER)[:, None, None, None], jittered, partners)
    alpha = (mask * opacity[:, None, None]).unsqueeze(1)  # (n, 1, S, S)
    out[rows] = (images[rows] * (1 - alpha) + content * alpha).clamp(0, 1)
    masks[rows] = mask
    return out, masks
