"""A run's images: listed and split before any is decoded, then sharded and shuffled per epoch,
each a pure function of the seed (and epoch and rank), so a resumed run sees the same."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from dskd_ray.config import DSKDConfig
from dskd_ray.errors import DataError
from dskd_ray.io.data import training_images


@dataclass
class TrainingSet:
    """The images of a run, split before any is decoded, so every path trains and calibrates
    on the same ones whichever images later turn out unreadable."""

    data: str  # what the user gave
    name: str  # the category (or folder) name
    train_uris: list[str]
    holdout_uris: list[str]

    @property
    def fingerprint(self) -> str:
        """A hash of which images train and which are held out: a resumed run must see the
        same ones (docs/design.md §3)."""
        digest = hashlib.sha256()
        for part in (self.train_uris, self.holdout_uris):
            digest.update(b"\0".join(u.encode("utf-8", "surrogateescape") for u in part) + b"\1")
        return digest.hexdigest()[:16]


def plan_training(data: str, config: DSKDConfig) -> TrainingSet:
    """List the normal images under `data` and split off the held-out ones (by URI)."""
    name, uris = training_images(data)
    if len(uris) < 2:
        raise DataError(
            f"{data}: {len(uris)} training image(s); at least 2 readable ones are needed"
        )
    train_idx, holdout_idx = split_holdout(len(uris), config.holdout_fraction, config.seed)
    return TrainingSet(data, name, [uris[i] for i in train_idx], [uris[i] for i in holdout_idx])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of n normal images into (train, held-out) index arrays."""
    order = np.random.default_rng(seed).permutation(n)
    n_holdout = int(round(n * fraction)) if n > 1 else 0
    if fraction > 0 and n >= 4:
        n_holdout = max(n_holdout, 1)  # a threshold needs at least one normal score
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


def epoch_order(
    n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, length: int | None = None
) -> np.ndarray:
    """One worker's shuffle of its n images for one epoch, repeated to `length` (default n).

    A pure function of (seed, epoch, rank), so a resumed or restarted run sees the same order;
    one worker shuffles exactly as a local run. Under DDP every rank walks the same number of
    steps (the all-reduce needs it), so shorter shards wrap around, as torch's
    DistributedSampler pads.
    """
    key = [seed, epoch] if world == 1 else [seed, epoch, rank]
    order = np.random.default_rng(key).permutation(n)
    return order if length is None else np.resize(order, length)


def shard(items: list[str], rank: int, world: int) -> list[str]:
    """Rank r's share of the images: every world-th one, starting at r."""
    return items[rank::world]
