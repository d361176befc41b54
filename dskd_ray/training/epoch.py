"""One epoch of distillation: the optimiser and its schedule, the teacher's cached pyramids,
the feature statistics `feature_norm=standardize` divides by, and the step, repeated over one
worker's images. What `fit` runs each epoch, on one process or on every Ray Train worker."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dskd_ray.config import DSKDConfig
from dskd_ray.model.inputs import images_to_tensor
from dskd_ray.model.loss import distillation_loss
from dskd_ray.model.network import DSKD
from dskd_ray.training.synthetic_defects import defect_generator, synthesize_defects


@dataclass
class Progress:
    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based within the epoch
    steps: int
    loss: float
    images_per_s: float


ProgressCallback = Callable[[Progress], None]


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


SGD_MOMENTUM = 0.9  # STFPM's


def make_optimizer(model: DSKD, config: DSKDConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.student_parameters(),
            lr=config.lr,
            momentum=SGD_MOMENTUM,
            weight_decay=config.weight_decay,
        )
    return torch.optim.Adam(
        model.student_parameters(),
        lr=config.lr,
        betas=config.betas,
        weight_decay=config.weight_decay,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: DSKDConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, config.epochs * steps_per_epoch)
    if config.lr_schedule == "cosine":
        # Late loss spikes with a constant Adam 0.005 (docs/design.md §3): decay to 1% of it.
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)),
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


FEATURE_STD_FLOOR = 1e-3  # the smallest per-channel spread feature_norm=standardize divides by


class TeacherCache:
    """Teacher pyramids of every training image, computed once (the teacher is frozen and
    there is no augmentation, so they are the same every epoch)."""

    def __init__(self, levels: list[torch.Tensor]) -> None:
        self.levels = levels

    @classmethod
    def build(
        cls, model: DSKD, images: torch.Tensor, device: torch.device, batch_size: int
    ) -> TeacherCache:
        chunks: list[list[torch.Tensor]] = []
        for start in range(0, len(images), batch_size):
            x = model.normalize(images_to_tensor(images[start : start + batch_size], device))
            chunks.append(model.teacher_features(x))
        return cls([torch.cat([c[k] for c in chunks]) for k in range(3)])

    def take(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [level[index] for level in self.levels]

    @staticmethod
    def bytes_needed(model: DSKD, n: int, image_size: int) -> int:
        per_image = sum(
            c * (image_size // s) ** 2
            for c, s in zip(model.spec.channels, model.config.strides, strict=True)
        )
        return per_image * 4 * n


@torch.no_grad()
def fit_feature_statistics(
    model: DSKD,
    images: torch.Tensor,
    cache: TeacherCache | None,
    device: torch.device,
    batch_size: int,
    all_reduce: Callable[[list[float]], list[float]] = lambda values: values,
) -> None:
    """Set the model's per-channel teacher statistics (feature_norm=standardize) to the mean
    and std of the teacher's features over every position of every training image.

    From the teacher cache when there is one (no extra forward pass), else batch by batch;
    `all_reduce` sums the moments over a worker group, so every worker gets the same values.
    """
    sizes = model.spec.channels
    moments = [torch.zeros(3, c, dtype=torch.float64) for c in sizes]  # count, Σx, Σx² per level

    def pyramids() -> Iterator[list[torch.Tensor]]:
        for start in range(0, len(images), batch_size):
            if cache is not None:
                yield [level[start : start + batch_size] for level in cache.levels]
            else:
                batch = images_to_tensor(images[start : start + batch_size], device)
                yield model.teacher_features(model.normalize(batch))

    for pyramid in pyramids():
        for k, level in enumerate(pyramid):
            f = level.double().transpose(0, 1).flatten(1)  # (C, B·h·w)
            moments[k] += torch.stack(
                [torch.full_like(f[:, 0], f.shape[1]), f.sum(1), f.square().sum(1)]
            ).cpu()
    total = all_reduce(torch.cat([m.flatten() for m in moments]).tolist())
    flat = torch.tensor(total, dtype=torch.float64)
    for k, (mean, std) in enumerate(model.feature_statistics()):
        count, sums, squares = flat[: 3 * sizes[k]].view(3, -1)
        flat = flat[3 * sizes[k] :]
        m = sums / count.clamp_min(1)
        var = squares / count.clamp_min(1) - m.square()
        # A channel the training images never move would divide by ~0: floor its spread.
        s = var.clamp_min(0).sqrt().clamp_min(FEATURE_STD_FLOOR)
        mean.copy_(m.float().view_as(mean))
        std.copy_(s.float().view_as(std))


def train_step(
    model: DSKD,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    teacher: list[torch.Tensor] | None,
    grad_clip: float | None,
    student_forward: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
    hard_share: float = 0.0,
    corrupted: torch.Tensor | None = None,
) -> torch.Tensor:
    """One optimisation step on a normalised batch; returns the (detached) loss.

    `student_forward` lets a DDP or torch.compile wrapper of `Students` stand in for it.
    `autocast_dtype` (e.g. torch.bfloat16 on CUDA) runs the forward passes under autocast;
    the loss is always computed in float32 (`distillation_loss` upcasts), in the form the
    config names, with hard mining over `hard_share` of the positions (`hard_mining_share`).

    `corrupted` (denoising students): the same batch with synthetic defects, normalised. The
    students read it — and a decoder fed by the teacher reads the teacher's pyramid *of it* —
    while the targets stay the teacher's features of the clean `x` (`teacher`, the cache).
    """
    amp = (
        torch.autocast(x.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with amp:
        if teacher is None:
            teacher = model.teacher_features(x)
        seen, decoder_input = x, teacher
        if corrupted is not None:
            seen = corrupted
            if decoder_reads_teacher(model.config):
                decoder_input = model.teacher_features(corrupted)
        # `is None`, not `or`: a torch.compile'd module has no truth value.
        forward = student_forward if student_forward is not None else Students(model)
        students = forward(seen, decoder_input)
    compared = model.comparable({"teacher": teacher, **students})
    cfg = model.config
    loss = distillation_loss(
        compared.pop("teacher"), compared, cfg.loss_form, hard_share, cfg.distance
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.student_parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


class Students(nn.Module):
    """The trainable parts of a DSKD, and nothing else, as one module for DDP.

    DDP broadcasts and all-reduces exactly these parameters and buffers; the frozen teacher
    is not a submodule here, so it is never synchronised (each worker holds its own copy).
    """

    def __init__(self, model: DSKD) -> None:
        super().__init__()
        self.parts = nn.ModuleList(model.student_modules())
        object.__setattr__(self, "_dskd", model)  # held, not registered

    @property
    def model(self) -> DSKD:
        return self._dskd

    def forward(
        self, x: torch.Tensor, teacher: list[torch.Tensor]
    ) -> dict[str, list[torch.Tensor]]:
        return self._dskd.student_features(x, teacher)


def decoder_reads_teacher(config: DSKDConfig) -> bool:
    """The decoder student's DF embedding reads the teacher's pyramid (not Se's)."""
    return config.uses_decoder_student and (
        config.df_input == "teacher" or not config.uses_encoder_student
    )


def hard_mining_share(config: DSKDConfig, step: int, total_steps: int) -> float:
    """The share of easy positions mined at `step` (0-based over the run): config.hard_mining,
    ramped in linearly over the first tenth of the run's `total_steps`, as Dinomaly ramps its
    0.9 over the first 1000 of 10000 iterations. A pure function of the step: resume is exact."""
    if config.hard_mining <= 0:
        return 0.0
    ramp = max(1, math.ceil(0.1 * total_steps))
    return config.hard_mining * min(1.0, step / ramp)


def iterate_batches(order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def run_epoch(
    model: DSKD,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    images: torch.Tensor,
    order: np.ndarray,
    config: DSKDConfig,
    device: torch.device,
    cache: TeacherCache | None = None,
    epoch: int = 1,
    on_progress: ProgressCallback | None = None,
    student_forward: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    rank: int = 0,
) -> EpochStats:
    """One pass over `images[order]` (uint8, (N, S, S, 3), on CPU or device).

    `fit` calls it with this worker's images, its strategy's `student_forward` (DDP under Ray
    Train), channels_last inputs, and bf16 autocast on CUDA.
    """
    model.train()
    start = time.perf_counter()
    total_loss = torch.zeros((), device=device)
    seen = 0
    steps = math.ceil(len(order) / config.batch_size)
    for step, idx in enumerate(iterate_batches(order, config.batch_size), 1):
        index = torch.from_numpy(idx)
        clean = batch_tensor(images, index, device)
        x = model.normalize(clean)
        corrupted = None
        if config.denoise > 0:  # defects drawn from (seed, epoch, step, rank): resume is exact
            generator = defect_generator(config.seed, epoch, step, rank, device)
            corrupted = model.normalize(synthesize_defects(clean, config.denoise, generator)[0])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            if corrupted is not None:
                corrupted = corrupted.contiguous(memory_format=torch.channels_last)
        teacher = cache.take(index.to(cache.levels[0].device)) if cache is not None else None
        share = hard_mining_share(config, (epoch - 1) * steps + step - 1, config.epochs * steps)
        loss = train_step(
            model, optimizer, x, teacher, config.grad_clip, student_forward, autocast_dtype, share,
            corrupted,
        )  # fmt: skip
        if scheduler is not None:
            scheduler.step()
        total_loss += loss * len(idx)
        seen += len(idx)
        if on_progress is not None:
            elapsed = time.perf_counter() - start
            on_progress(
                Progress(epoch, config.epochs, step, steps, float(loss), seen / max(elapsed, 1e-9))
            )
    return EpochStats(float(total_loss) / max(seen, 1), seen, time.perf_counter() - start)


def batch_tensor(images: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, S, S, 3) rows → float (B, 3, S, S) in [0, 1] on device."""
    return images_to_tensor(images[index.to(images.device)], device)
