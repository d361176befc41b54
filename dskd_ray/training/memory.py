"""Fitting the teacher's memory (docs/design.md §2, "The teacher's memory"): which of the
training images' patches the bank keeps.

The bank is a subsample of the normal training patches (`anomaly_map.memory_features`):
PatchCore's greedy coreset, or a random one. Its size is the scoring cost (every test patch is
compared with every bank row), so it is capped by `DSKDConfig.memory_size`, and the coreset is
how a small bank still covers the normal patches: each pick is the patch farthest from those
already picked, so no normal pattern is left far from the bank.

Pure PyTorch and numpy: no Ray. Under Ray Train each worker picks from its own shard and rank 0
picks again from the union (`train.fit_memory`), so no worker ships all its patches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch

# The coreset is picked in a random projection of the patches to this many dimensions
# (PatchCore's choice): distances are kept to a few percent, and each pick reads less memory.
PROJECTION_DIMS = 128
# PatchCore's approximate start: the first pick is the patch farthest, on average, from this
# many random patches (not themselves picked), instead of a random first pick.
START_POINTS = 10
# One worker keeps at most this many bytes of candidate patches (float32); more images than
# fit give each image an equal random share of its patches. 512 MiB is 880k Lite0 patches
# (MTD's 685 training images at 256² have 701k).
CANDIDATE_BYTES = 512 * 2**20


def candidates_per_image(images: int, patches_per_image: int, channels: int) -> int:
    """Patches each image contributes to the candidates: all of them, or an equal share of
    CANDIDATE_BYTES."""
    budget = CANDIDATE_BYTES // (4 * channels)
    return min(patches_per_image, max(1, budget // max(images, 1)))


def random_subsample(n: int, size: int, seed: int) -> torch.Tensor:
    """Indices of `size` of n rows, drawn without replacement, in ascending order."""
    if size >= n:
        return torch.arange(n)
    pick = np.random.default_rng(seed).choice(n, size, replace=False)
    return torch.from_numpy(np.sort(pick))


@torch.no_grad()
def greedy_coreset(patches: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of `size` rows of `patches` (N, C), in pick order: PatchCore's approximate greedy
    coreset. Each pick is the row farthest from every row already picked, so the largest
    distance from any row to its nearest pick shrinks as fast as a greedy choice can make it.

    One matrix-vector product over all rows per pick (no loop over rows); in a random
    projection to PROJECTION_DIMS when the patches have more, centred so that the squared
    distances ‖x‖² + ‖y‖² − 2x·y keep their float32 digits. Deterministic for a seed.
    """
    n, channels = patches.shape
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same picks on any device
    x = patches.float()
    x = x - x.mean(dim=0)
    if channels > PROJECTION_DIMS:
        projection = torch.randn(channels, PROJECTION_DIMS, generator=generator)
        x = x @ (projection / math.sqrt(PROJECTION_DIMS)).to(x.device)
    norms = (x * x).sum(dim=1)  # (N,)
    starts = torch.randperm(n, generator=generator)[:START_POINTS].to(x.device)
    to_starts = (norms[:, None] + norms[starts][None, :] - 2 * x @ x[starts].t()).clamp_min(0)
    # Squared distance of every row to the picks so far; before the first pick, PatchCore's
    # stand-in: the mean distance to the start points.
    nearest = to_starts.sqrt().mean(dim=1).square()
    picked = torch.empty(size, dtype=torch.long)
    distance = torch.empty(n, device=x.device)
    with _one_thread(x.device):
        for i in range(size):
            j = int(nearest.argmax())
            picked[i] = j
            # ‖x − x_j‖² = ‖x‖² − 2 x·x_j + ‖x_j‖²: one matrix-vector pass over N per pick.
            torch.addmv(norms, x, x[j], alpha=-2, out=distance)
            distance.add_(norms[j])
            torch.minimum(nearest, distance, out=nearest)
    return picked


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """The greedy loop on one CPU thread: it is thousands of small passes, and with several
    threads each pass waits for all of them, which a busy machine makes ruinous (512 picks of
    55k patches: 1.7 s on one thread, 38 s on two, at load 6 on 2 cores)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def select_bank(patches: torch.Tensor, size: int, sampling: str, seed: int) -> torch.Tensor:
    """(min(size, N), C) rows of `patches` (N, C) for the bank: a greedy coreset or random."""
    if sampling == "coreset":
        return patches[greedy_coreset(patches, size, seed).to(patches.device)]
    return patches[random_subsample(len(patches), size, seed).to(patches.device)]
