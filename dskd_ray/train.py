"""Local training (DESIGN §1 recipe): one process, CPU or one GPU. No Ray here.

The per-epoch step (`run_epoch`) is what the Ray Train loop calls on each worker too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dskd_ray.anomaly_map import baseline_from_mean, level_maps, level_moments, level_statistics
from dskd_ray.checkpoint import (
    Checkpoint,
    Threshold,
    checkpoint_exists,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from dskd_ray.config import DSKDConfig
from dskd_ray.data import load_images, training_images
from dskd_ray.errors import CheckpointError, DataError
from dskd_ray.loss import distillation_loss
from dskd_ray.model import DSKD
from dskd_ray.scoring import compute_maps, images_to_tensor, resolve_device

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


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Shuffle for one epoch, a pure function of (seed, epoch) so a resumed run sees the same."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def make_optimizer(model: DSKD, config: DSKDConfig) -> torch.optim.Optimizer:
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
        # Late loss spikes with a constant Adam 0.005 (DESIGN §4): decay to 1% of the rate.
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)),
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


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
            c * (image_size // s) ** 2 for c, s in zip(model.spec.channels, (4, 8, 16), strict=True)
        )
        return per_image * 4 * n


def train_step(
    model: DSKD,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    teacher: list[torch.Tensor] | None,
    grad_clip: float | None,
    student_forward: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One optimisation step on a normalised batch; returns the (detached) loss.

    `student_forward` lets a DDP or torch.compile wrapper of `Students` stand in for it.
    `autocast_dtype` (e.g. torch.bfloat16 on CUDA) runs the forward passes under autocast;
    the loss is always computed in float32 (`distillation_loss` upcasts).
    """
    amp = (
        torch.autocast(x.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with amp:
        if teacher is None:
            teacher = model.teacher_features(x)
        # `is None`, not `or`: a torch.compile'd module has no truth value.
        forward = student_forward if student_forward is not None else Students(model)
        students = forward(x, teacher)
    loss = distillation_loss(teacher, students)
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

    def forward(
        self, x: torch.Tensor, teacher: list[torch.Tensor]
    ) -> dict[str, list[torch.Tensor]]:
        return self._dskd.student_features(x, teacher)


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
) -> EpochStats:
    """One pass over `images[order]` (uint8, (N, S, S, 3), on CPU or device).

    The Ray Train loop calls this on every worker with its shard, a DDP `student_forward`
    and channels_last inputs (and bf16 autocast on CUDA).
    """
    model.train()
    start = time.perf_counter()
    total_loss = torch.zeros((), device=device)
    seen = 0
    steps = math.ceil(len(order) / config.batch_size)
    for step, idx in enumerate(iterate_batches(order, config.batch_size), 1):
        index = torch.from_numpy(idx)
        x = model.normalize(_batch(images, index, device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        teacher = cache.take(index.to(cache.levels[0].device)) if cache is not None else None
        loss = train_step(
            model, optimizer, x, teacher, config.grad_clip, student_forward, autocast_dtype
        )
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
    rows = images[index.to(images.device)]
    return rows.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


@torch.inference_mode()
def score_images(
    model: DSKD, images: np.ndarray, device: torch.device, batch_size: int
) -> np.ndarray:
    """Image scores of (N, S, S, 3) uint8 images."""
    model.eval()
    scores = []
    for start in range(0, len(images), batch_size):
        _, s = compute_maps(model, images_to_tensor(images[start : start + batch_size], device))
        scores.append(s.float().cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


@torch.inference_mode()
def fit_level_statistics(
    model: DSKD, images: np.ndarray, device: torch.device, batch_size: int
) -> None:
    """Set model.level_location / level_spread from each student's level maps on normal images,
    pooled over every pixel of every image (see `anomaly_map.level_statistics`)."""
    model.eval()
    moments = torch.zeros(3, 2, 3, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = model.normalize(images_to_tensor(images[start : start + batch_size], device))
        moments += level_moments(level_maps(model(x)))
    location, spread = level_statistics(moments, model.config.level_normalization)
    model.level_location.copy_(location.to(model.level_location.device))
    model.level_spread.copy_(spread.to(model.level_spread.device))


@torch.inference_mode()
def fit_map_baseline(
    model: DSKD,
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    batch_size: int,
    max_images: int = 256,
) -> None:
    """Set model.map_baseline to the per-pixel mean map of (at most `max_images` of) `images`.

    Training images, not the hold-out: the threshold is then fitted on images the baseline has
    not seen. Their maps run a little lower than unseen normals', evenly, which a divisor's
    shape does not mind. A floor keeps near-zero pixels from blowing up the ratio.
    """
    model.eval()
    n = len(images)
    if n == 0:
        return
    pick = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int))
    total = torch.zeros_like(model.map_baseline, dtype=torch.float64)
    for start in range(0, len(pick), batch_size):
        batch = np.asarray(images[pick[start : start + batch_size]])
        maps, _ = compute_maps(model, images_to_tensor(batch, device), divide_baseline=False)
        total += maps.double().sum(dim=0)
    mean = (total / len(pick)).float()
    # A divisor needs a floor; a subtrahend does not.
    divisor = model.config.map_baseline == "mean"
    model.map_baseline.copy_(baseline_from_mean(mean) if divisor else mean)


def calibrate(
    model: DSKD,
    train_images: np.ndarray | torch.Tensor,
    holdout: np.ndarray,
    config: DSKDConfig,
    device: torch.device,
) -> Threshold | None:
    """After training: level statistics, then the map baseline, then the threshold, each on the
    maps the previous step leaves, so the checkpoint scores exactly as it was calibrated.

    Level statistics come from the held-out normal images (training images' maps run low: the
    students have seen them); without a hold-out, from the training images.
    """
    if config.level_normalization != "none":
        normal = holdout if len(holdout) else np.asarray(train_images)
        fit_level_statistics(model, normal, device, config.batch_size)
    if config.map_baseline != "none":
        fit_map_baseline(model, train_images, device, config.batch_size)
    return compute_threshold(model, holdout, config, device)


def compute_threshold(
    model: DSKD, holdout: np.ndarray, config: DSKDConfig, device: torch.device
) -> Threshold | None:
    """The high quantile of held-out normal images' scores (DESIGN §1); None without a hold-out."""
    if len(holdout) == 0:
        log.warning("no held-out normal images: the checkpoint will have no image threshold")
        return None
    scores = score_images(model, holdout, device, config.batch_size)
    value = float(np.quantile(scores, config.threshold_quantile))
    return Threshold(value, "quantile", config.threshold_quantile, [float(s) for s in scores])


def train(
    config: DSKDConfig,
    data: str,
    out: str,
    device: str = "auto",
    resume: bool = False,
    on_progress: ProgressCallback | None = None,
    on_epoch: Callable[[int, EpochStats], None] | None = None,
) -> TrainResult:
    """Train on the normal images under `data`; write the checkpoint to `out` every epoch."""
    dev = resolve_device(device)
    state: Checkpoint | None = None
    if resume and checkpoint_exists(out):
        state = load_checkpoint(out)
        if state.training is None or state.training.get("complete"):
            raise CheckpointError(
                f"{out} is a finished run: nothing to resume (train to a new --out)"
            )
        # The run's own config wins; only the epoch budget may grow.
        config = state.config.replace(epochs=max(config.epochs, state.config.epochs))
    seed_everything(config.seed)

    name, uris = training_images(data)
    images, kept, skipped = load_images(uris, config.image_size)
    if skipped:
        log.warning("skipped %d unreadable training image(s) of %d", len(skipped), len(uris))
    if len(kept) < 2:
        raise DataError(f"{data}: {len(kept)} readable training image(s); at least 2 are needed")
    train_idx, holdout_idx = split_holdout(len(kept), config.holdout_fraction, config.seed)
    train_images = torch.from_numpy(images[train_idx])
    holdout_images = images[holdout_idx]
    if dev.type == "cuda":
        train_images = train_images.pin_memory()

    model = state.build_model().to(dev) if state is not None else DSKD(config).to(dev)
    # channels_last everywhere (2x the training step on the reference CPU: bench/train_step.py);
    # bf16 autocast on CUDA. The Ray Train workers do the same.
    cuda = dev.type == "cuda"
    model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    start_epoch = 0
    history: list[EpochStats] = []
    if state is not None and state.training is not None:
        optimizer.load_state_dict(state.training["optimizer"])
        scheduler.load_state_dict(state.training["scheduler"])
        start_epoch = int(state.training["epoch"])
        history = [EpochStats(**h) for h in state.training.get("history", [])]
        log.info("resuming %s at epoch %d of %d", out, start_epoch + 1, config.epochs)

    cache = None
    need = TeacherCache.bytes_needed(model, len(train_idx), config.image_size)
    if need <= config.teacher_cache_mb * 2**20:
        cache = TeacherCache.build(model, train_images, dev, config.batch_size)

    meta = {
        "data": data,
        "category": name,
        "n_train": len(train_idx),
        "n_holdout": len(holdout_idx),
    }
    for epoch in range(start_epoch, config.epochs):
        order = epoch_order(len(train_idx), config.seed, epoch)
        stats = run_epoch(
            model, optimizer, scheduler, train_images, order, config, dev, cache,
            epoch + 1, on_progress, autocast_dtype=torch.bfloat16 if cuda else None,
            channels_last=True,
        )  # fmt: skip
        history.append(stats)
        if on_epoch is not None:
            on_epoch(epoch + 1, stats)
        if not math.isfinite(stats.loss):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {stats.loss})")
        training = {
            "epoch": epoch + 1,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": [vars(h) for h in history],
        }
        if epoch + 1 < config.epochs:
            save_checkpoint(make_checkpoint(model, None, training, meta), out)

    model = model.to(memory_format=torch.contiguous_format)
    threshold = calibrate(model, train_images.numpy(), holdout_images, config, dev)
    # The finished checkpoint drops the optimizer state: scoring actors load it, and Adam's
    # moments would triple its size.
    training = {"epoch": config.epochs, "complete": True, "history": [vars(h) for h in history]}
    final = make_checkpoint(model, threshold, training, meta)
    save_checkpoint(final, out)
    return TrainResult(final, history, skipped, len(train_idx), len(holdout_idx))
