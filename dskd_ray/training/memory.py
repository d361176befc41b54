"""Fitting the teacher's memory (docs/design.md §2, "The teacher's memory"): which of the
training images' patches the bank keeps.

The bank is a subsample of the normal training patches (`anomaly_map.memory_features`):
PatchCore's greedy coreset, or a random one. Its size is the scoring cost (every test patch is
compared with every bank row), so it is capped by `DSKDConfig.memory_size`, and the coreset is
how a small bank still covers the normal patches: each pick is the patch farthest from those
already picked, so no normal pattern is left far from the bank.

Pure PyTorch and numpy: no Ray. Under Ray Train each worker picks from its own shard and rank 0
picks again from the union (`fit_memory`), so no worker ships all its patches.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dskd_ray.config import DSKDConfig
from dskd_ray.model.anomaly_map import memory_features
from dskd_ray.model.network import DSKD
from dskd_ray.progress import PROGRESS, clock
from dskd_ray.training.epoch import batch_tensor
from dskd_ray.training.strategy import Strategy

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


def memory_seed(seed: int, rank: int) -> int:
    """The memory's random stream for one worker: a pure function of (seed, rank), so a local
    run and one Ray worker pick the same bank."""
    return int(np.random.SeedSequence([seed, rank, 22]).generate_state(1)[0])


@torch.inference_mode()
def memory_candidates(
    model: DSKD, images: torch.Tensor, device: torch.device, batch_size: int, seed: int
) -> torch.Tensor:
    """(n·k, C) float32 on the CPU: the memory patches of `images` (uint8 (n, S, S, 3)), all k
    of each image's, or an equal random share when they exceed `memory.CANDIDATE_BYTES`."""
    assert model.memory is not None
    n, size = len(images), model.config.image_size
    per_image, channels = (size // 8) ** 2, model.memory.channels
    keep = candidates_per_image(n, per_image, channels)
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(n * keep, channels)
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        x = model.normalize(batch_tensor(batch, torch.arange(len(batch)), device))
        patches = memory_features(model.teacher_features(x), model.config.strides)  # (B, C, S/8, …)
        rows = patches.permute(0, 2, 3, 1).reshape(len(batch), per_image, channels).cpu()
        if keep < per_image:
            pick = torch.stack([torch.randperm(per_image, generator=generator)[:keep]
                                for _ in range(len(batch))])  # fmt: skip
            rows = torch.gather(rows, 1, pick[:, :, None].expand(-1, -1, channels))
        out[start * keep : (start + len(batch)) * keep] = rows.reshape(-1, channels)
    return out


def fit_memory(
    model: DSKD, images: torch.Tensor, config: DSKDConfig, strategy: Strategy, device: torch.device
) -> dict[str, Any]:
    """Fill the memory bank from every worker's training images (`images`: this worker's).

    Each worker picks from its own patches — a coreset of up to `memory_size`, or a random
    share in proportion to its patches — and rank 0 picks the bank from the union again, so
    the bank covers every shard and no worker ships all its patches. With one worker the
    union is the bank: a local run and a one-worker Ray run pick the same. Returns what the
    checkpoint's meta keeps of it (on rank 0; {} elsewhere): bank size, candidates, seconds.
    """
    assert model.memory is not None
    model.eval()
    start = time.perf_counter()
    seed = memory_seed(config.seed, strategy.rank)
    patches = memory_candidates(model, images, device, config.batch_size, seed)
    (total,) = strategy.all_reduce([float(len(patches))])
    share = config.memory_size
    if config.memory_sampling == "random":
        share = round(config.memory_size * len(patches) / max(total, 1.0))
    # The coreset's passes over every candidate run where the model does (a GPU's are fast).
    mine = select_bank(patches.to(device), share, config.memory_sampling, seed).cpu()
    del patches
    parts = strategy.all_gather(mine)
    if strategy.rank != 0:
        return {}
    union = torch.cat(parts)
    bank = union
    if len(union) > config.memory_size:
        again = memory_seed(config.seed, strategy.world)
        bank = select_bank(union.to(device), config.memory_size, config.memory_sampling, again)
    model.memory.bank = bank.to(model.memory.bank.device)
    seconds = time.perf_counter() - start
    PROGRESS.info(
        "memory: %d of %d patches (%s) in %s", len(bank), int(total), config.memory_sampling,
        clock(seconds),
    )  # fmt: skip
    return {
        "bank": len(bank), "candidates": int(total), "sampling": config.memory_sampling,
        "workers": strategy.world, "fit_s": round(seconds, 2),
    }  # fmt: skip
