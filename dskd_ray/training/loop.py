"""Training (docs/design.md §3): one routine, `fit`, for a local run and for each Ray Train worker.

`fit` is a straight line: set-up (seed, model, this worker's images, teacher cache, optimiser,
resume), the epochs, then calibration and the final checkpoint. What differs between one process
and a Ray Train worker group (sharding, all-reduce, DDP, where checkpoints go) is a small
`Strategy`; `OneProcess` is the local one and `dskd_ray.training.distributed` has Ray Train's. No Ray here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from dskd_ray.config import DSKDConfig
from dskd_ray.errors import CheckpointError, DataError, DSKDError
from dskd_ray.inference import tiling
from dskd_ray.inference.scoring import ModelScorer, resolve_device
from dskd_ray.io.data import decode_images, load_images, load_model_inputs, training_images
from dskd_ray.model.anomaly_map import (
    baseline_from_mean,
    level_maps,
    level_moments,
    level_statistics,
    memory_features,
    moments,
    spread_from_moments,
)
from dskd_ray.model.checkpoint import (
    Checkpoint,
    Threshold,
    checkpoint_exists,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from dskd_ray.model.inputs import images_to_tensor
from dskd_ray.model.loss import distillation_loss
from dskd_ray.model.network import DSKD
from dskd_ray.progress import PROGRESS, clock, eta
from dskd_ray.training.memory import candidates_per_image, select_bank
from dskd_ray.training.synthetic_defects import defect_generator, synthesize_defects

log = logging.getLogger(__name__)


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


@dataclass
class TrainResult:
    checkpoint: Checkpoint
    history: list[EpochStats] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_train: int = 0
    n_holdout: int = 0

    @classmethod
    def from_checkpoint(cls, final: Checkpoint) -> TrainResult:
        """What a finished run's checkpoint says about its training."""
        training, meta = final.training or {}, final.meta
        return cls(
            final,
            [EpochStats(**h) for h in training.get("history", [])],
            [tuple(s) for s in meta.get("skipped", [])],  # type: ignore[misc]
            int(meta.get("n_train", 0)),
            int(meta.get("n_holdout", 0)),
        )


@dataclass
class TrainingSet:
    """The images of a run, split before any is decoded, so every path trains and calibrates
    on the same ones whichever images later turn out unreadable."""

    data: str  # what the user gave
    name: str  # the category (or folder) name
    train_uris: list[str]
    holdout_uris: list[str]


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
        clean = _batch(images, index, device)
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


def _batch(images: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, S, S, 3) rows → float (B, 3, S, S) in [0, 1] on device."""
    return images_to_tensor(images[index.to(images.device)], device)


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
        maps, _ = model.predict(images_to_tensor(batch, device), divide_baseline=False)
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
) -> Threshold | None:
    """After training: level statistics, then the memory's gain, then the per-pixel baseline,
    then the threshold, each on the maps the previous step leaves, so the checkpoint scores
    exactly as it was calibrated.

    `train_images` are model inputs (tiles, for a tiled model); `holdout` whole images (full
    resolution, for a tiled model: the threshold is a quantile of stitched maps' scores).

    Level statistics come from the held-out normal images (training images' maps run low: the
    students have seen them); without a hold-out, from `train_images` (which `fit` gives as the
    baseline's sample of the training images: `baseline_sample`).
    """
    normal = model_rows(holdout, config) if len(holdout) else np.asarray(train_images)
    if config.level_normalization != "none":
        fit_level_statistics(model, normal, device, config.batch_size)
    if model.memory is not None:
        fit_memory_gain(model, normal, device, config.batch_size)
    if config.map_baseline != "none":
        fit_pixel_baseline(model, train_images, device, config.batch_size)
    return compute_threshold(model, holdout, config, device)


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


# --- the teacher's memory ------------------------------------------------------------------------


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
        x = model.normalize(_batch(batch, torch.arange(len(batch)), device))
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


# --- what differs between one process and a worker group ----------------------------------------


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
        if not last and self.out is not None:  # the last epoch's goes into the final one
            save_checkpoint(make(), self.out)

    def finish(self, final: Checkpoint | None) -> None:
        assert final is not None
        if self.out is not None:
            save_checkpoint(final, self.out)


def resume_config(requested: DSKDConfig, state: Checkpoint) -> DSKDConfig:
    """A resumed run's config: its own; only the epoch budget may grow."""
    return state.config.replace(epochs=max(requested.epochs, state.config.epochs))


# --- the one training routine ------------------------------------------------------------------


def fit(
    config: DSKDConfig,
    images: TrainingSet,
    strategy: Strategy,
    device: torch.device,
    state: Checkpoint | None = None,
    meta: dict[str, Any] | None = None,
    on_progress: ProgressCallback | None = None,
    on_epoch: Callable[[int, EpochStats], None] | None = None,
) -> Checkpoint | None:
    """Train on `images` from `state` (an unfinished run's checkpoint) or from scratch, fit the
    memory, then calibrate; returns the final checkpoint (on rank 0; None on the others).

    `on_epoch(epoch, stats)` runs on every worker after each epoch, before its checkpoint.
    With no student (`students="none"`) nothing is trained: the memory is fitted at once.
    """
    rank, world = strategy.rank, strategy.world
    seed_everything(config.seed)
    model = state.build_model() if state is not None else DSKD(config)
    # channels_last on every device (2x the training step on the reference CPU:
    # bench/train_step.py); bf16 autocast on CUDA where the GPU has it.
    model = model.to(device).to(memory_format=torch.channels_last)

    # This worker's share of the training images, decoded once.
    uris = shard(images.train_uris, rank, world)
    decoded, kept, skipped, owner = load_model_inputs(
        uris, config.image_size, config.tiled, config.tile_overlap
    )
    if config.tiled and rank == 0:
        log.info("%d tiles of %d² from %d images", len(decoded), config.image_size, len(kept))
    longest, fewest = strategy.all_reduce([float(len(decoded)), float(-len(decoded))], "max")
    if -fewest < 1:
        where = "a worker's shard" if world > 1 else "them"
        raise DataError(f"{images.data}: no readable training image in {where}")
    skipped = [s for part in strategy.all_gather(skipped) for s in part]
    train_images = torch.from_numpy(decoded)
    if device.type == "cuda":
        train_images = train_images.pin_memory()
    meta = {
        "data": images.data,
        "category": images.name,
        "n_train": len(images.train_uris) - len(skipped),
        "n_holdout": len(images.holdout_uris),
        **(meta or {}),
    }
    training = {"epoch": 0, "history": [], "resumed_at": []}
    if config.has_students:
        training = _train_students(
            model, config, train_images, int(longest), strategy, device, state, meta,
            on_progress, on_epoch,
        )  # fmt: skip
    model = model.to(memory_format=torch.contiguous_format)
    return _finish(
        model, images, train_images, kept, owner, skipped, strategy, device, training, meta
    )


def _train_students(
    model: DSKD,
    config: DSKDConfig,
    train_images: torch.Tensor,
    length: int,
    strategy: Strategy,
    device: torch.device,
    state: Checkpoint | None,
    meta: dict[str, Any],
    on_progress: ProgressCallback | None,
    on_epoch: Callable[[int, EpochStats], None] | None,
) -> dict[str, Any]:
    """The epochs: this worker's `train_images` (each worker walks `length` of them an epoch),
    from `state` if it is an unfinished run. Returns the training record (epoch, history,
    resumed_at) the final checkpoint keeps."""
    rank, world = strategy.rank, strategy.world
    cuda = device.type == "cuda"
    autocast = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    student_forward = strategy.wrap(Students(model), device)
    per_worker = config.batch_size // world  # config.batch_size is the global batch
    worker_config = config.replace(batch_size=per_worker)
    cache = None
    need = TeacherCache.bytes_needed(model, len(train_images), config.image_size)
    if need <= config.teacher_cache_mb * 2**20:
        cache = TeacherCache.build(model, train_images, device, per_worker)
    if config.feature_norm == "standardize" and state is None:  # a resumed run has its own
        fit_feature_statistics(
            model, train_images, cache, device, per_worker, lambda v: strategy.all_reduce(v)
        )

    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, math.ceil(length / per_worker))
    training = (state.training or {}) if state is not None else {}
    start_epoch = int(training.get("epoch", 0))
    history: list[dict[str, Any]] = list(training.get("history", []))
    resumed_at: list[int] = list(training.get("resumed_at", []))
    if "optimizer" in training:
        optimizer.load_state_dict(training["optimizer"])
        scheduler.load_state_dict(training["scheduler"])
        resumed_at.append(start_epoch)
        if rank == 0:
            log.info("resuming at epoch %d of %d", start_epoch + 1, config.epochs)

    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        order = epoch_order(len(train_images), config.seed, epoch, rank, world, length)
        stats = run_epoch(
            model, optimizer, scheduler, train_images, order, worker_config, device, cache,
            epoch + 1, on_progress, student_forward, autocast, channels_last=True, rank=rank,
        )  # fmt: skip
        loss_sum, seen = strategy.all_reduce([stats.loss * stats.images, float(stats.images)])
        stats = EpochStats(loss_sum / max(seen, 1), int(seen), stats.seconds)
        history.append(asdict(stats))
        if rank == 0:
            elapsed = time.perf_counter() - started
            done = epoch + 1 - start_epoch
            PROGRESS.info(
                "epoch %d/%d: loss %.4f, %.1f images/s, elapsed %s, ETA %s",
                epoch + 1, config.epochs, stats.loss, stats.images_per_s, clock(elapsed),
                eta(done, config.epochs - start_epoch, elapsed),
            )  # fmt: skip
        if on_epoch is not None:
            on_epoch(epoch + 1, stats)
        if not math.isfinite(stats.loss):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {stats.loss})")
        progress = {"epoch": epoch + 1, "history": history, "resumed_at": resumed_at}

        def resumable(progress: dict[str, Any] = progress) -> Checkpoint:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            return make_checkpoint(model, None, {**progress, **state}, meta)

        strategy.checkpoint(epoch + 1, stats, epoch + 1 == config.epochs, resumable)
    return {"epoch": config.epochs, "history": history, "resumed_at": resumed_at}


def _finish(
    model: DSKD,
    images: TrainingSet,
    train_images: torch.Tensor,
    kept: list[str],
    owner: np.ndarray,
    skipped: list[tuple[str, str]],
    strategy: Strategy,
    device: torch.device,
    training: dict[str, Any],
    meta: dict[str, Any],
) -> Checkpoint | None:
    """After the last epoch: the memory from every worker's images, then calibration and the
    final checkpoint on rank 0 (returned there; None elsewhere)."""
    config = model.config
    if model.memory is not None:
        meta = {**meta, "memory": fit_memory(model, train_images, config, strategy, device)}
    final = None
    if strategy.rank == 0:
        # Calibration on rank 0, on the same images whichever path trained: the held-out
        # ones and an even sample of every readable training image (not only this shard).
        unreadable = {s[0] for s in skipped}
        readable = [u for u in images.train_uris if u not in unreadable]
        sample = _baseline_images(
            [readable[i] for i in baseline_sample(len(readable))],
            train_images.numpy(), kept, owner, config,
        )  # fmt: skip
        if config.tiled:
            holdout, _, holdout_skipped = decode_images(images.holdout_uris, None)
        else:
            holdout, _, holdout_skipped = load_images(images.holdout_uris, config.image_size)
        threshold = calibrate(model, sample, holdout, config, device)
        # The finished checkpoint drops the optimizer state: scoring actors load it, and Adam's
        # moments would triple its size.
        done = {**training, "complete": True}
        final_meta = {**meta, "n_holdout": len(holdout), "skipped": skipped + holdout_skipped}
        final = make_checkpoint(model, threshold, done, final_meta)
    strategy.finish(final)
    return final


def add_memory(
    checkpoint: Checkpoint,
    data: str,
    config: DSKDConfig,
    out: str | None = None,
    device: str = "auto",
) -> Checkpoint:
    """A trained model with the teacher's memory added, trained no further: `config` is the
    checkpoint's with the memory's fields changed. The memory is fitted on the training images
    the run had (the same hold-out split), then the model is calibrated again — what `fit`
    does after its last epoch, so the result scores as a run trained with the memory would.
    Written to `out` when given.
    """
    if not config.has_memory:
        raise DSKDError("add_memory needs a config with memory='knn'")
    unchanged = ("memory", "memory_size", "memory_sampling")
    if config.replace(**{k: getattr(checkpoint.config, k) for k in unchanged}) != checkpoint.config:
        raise DSKDError("add_memory changes the memory's fields only; train again for the rest")
    dev = resolve_device(device)
    model = DSKD(config, load_weights=False)
    state = {k: v for k, v in checkpoint.state_dict.items() if not k.startswith("memory.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("memory.") for k in missing):
        raise CheckpointError(f"checkpoint does not fit its own config: {missing[:3]}")
    model.teacher_identity = checkpoint.teacher_identity
    model = model.to(dev).eval()
    images = plan_training(data, config)
    decoded, kept, skipped, owner = load_model_inputs(
        images.train_uris, config.image_size, config.tiled, config.tile_overlap
    )
    training = {k: v for k, v in (checkpoint.training or {}).items() if k != "complete"}
    meta = {k: v for k, v in checkpoint.meta.items() if k not in ("model_id", "created_at")}
    final = _finish(
        model, images, torch.from_numpy(decoded), kept, owner, skipped, OneProcess(out), dev,
        training, {**meta, "memory_added_to": checkpoint.model_id},
    )  # fmt: skip
    assert final is not None
    return final


def _baseline_images(
    wanted: list[str], decoded: np.ndarray, kept: list[str], owner: np.ndarray, config: DSKDConfig
) -> np.ndarray:
    """The model inputs (images or tiles) of `wanted`: rows of this worker's own when it holds
    them all, else decoded."""
    index = {uri: i for i, uri in enumerate(kept)}
    if all(uri in index for uri in wanted):
        rows = np.flatnonzero(np.isin(owner, [index[uri] for uri in wanted]))
        return decoded[rows]
    return load_model_inputs(wanted, config.image_size, config.tiled, config.tile_overlap)[0]


def train(
    config: DSKDConfig,
    data: str,
    out: str,
    device: str = "auto",
    resume: bool = False,
    on_progress: ProgressCallback | None = None,
    on_epoch: Callable[[int, EpochStats], None] | None = None,
) -> TrainResult:
    """Train on the normal images under `data` in this process; write the checkpoint to `out`
    every epoch (`resume=True` continues an interrupted run from there)."""
    dev = resolve_device(device)
    state: Checkpoint | None = None
    if resume and checkpoint_exists(out):
        state = load_checkpoint(out)
        if state.training is None or state.training.get("complete"):
            raise CheckpointError(
                f"{out} is a finished run: nothing to resume (train to a new --out)"
            )
        config = resume_config(config, state)
        log.info("resuming %s", out)
    images = plan_training(data, config)
    final = fit(config, images, OneProcess(out), dev, state, None, on_progress, on_epoch)
    assert final is not None
    return TrainResult.from_checkpoint(final)
