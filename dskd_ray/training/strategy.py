"""What differs between one process and a worker group: which worker this is, how workers
agree, where checkpoints go. `OneProcess` here; `distributed.RayTrainStrategy` for Ray Train."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from dskd_ray.model.checkpoint import (
    Checkpoint,
    save_checkpoint,
)
from dskd_ray.training.epoch import EpochStats, Students


class Strategy(Protocol):
    """The distributed part of training: which worker this is, how workers agree, where
    checkpoints go. `OneProcess` below; `distributed.RayTrainStrategy` for Ray Train."""

    rank: int
    world: int

    def wrap(self, students: Students, device: torch.device) -> nn.Module:
        """The module the training step calls: the students, or DDP over them."""
        ...

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]: ...

    def all_gather(self, obj: Any) -> list[Any]: ...

    def checkpoint(
        self, epoch: int, stats: EpochStats, last: bool, make: Callable[[], Checkpoint]
    ) -> None:
        """After each epoch: report it; keep a resumable checkpoint when one is due (`make`
        builds it; only rank 0 calls it)."""
        ...

    def finish(self, final: Checkpoint | None) -> None:
        """The calibrated final checkpoint (None on ranks other than 0)."""
        ...


class OneProcess:
    """Local training: one worker; every epoch's checkpoint and the final one go to `out`."""

    rank, world = 0, 1

    def __init__(self, out: str | None) -> None:
        self.out = out  # None: keep nothing (the caller saves the final checkpoint)

    def wrap(self, students: Students, device: torch.device) -> nn.Module:
        return students

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        return values

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def checkpoint(
        self, epoch: int, stats: EpochStats, last: bool, make: Callable[[], Checkpoint]
    ) -> None:
        # The last epoch's too: the memory and calibration that follow take minutes, and an
        # interruption there must not lose the epochs (--resume goes on from it).
        if self.out is not None:
            save_checkpoint(make(), self.out)

    def finish(self, final: Checkpoint | None) -> None:
        assert final is not None
        if self.out is not None:
            save_checkpoint(final, self.out)
