"""Training (docs/design.md §3): one routine, `fit`, for a local run and for each Ray Train worker.

`fit` is a straight line: set-up (seed, model, this worker's images, teacher cache, optimiser,
resume), the epochs, then calibration and the final checkpoint. What differs between one process
and a Ray Train worker group (sharding, all-reduce, DDP, where checkpoints go) is a small
`Strategy`; `OneProcess` is the local one and `dskd_ray.training.distributed` has Ray Train's. No Ray here.

Its parts live beside it: `dataset` (the split, the shards, each epoch's order), `epoch` (the
optimiser, the teacher cache, the step and the epoch), `memory` (the teacher's memory bank),
`calibration` (statistics, baseline, threshold), `strategy` (`Strategy`, `OneProcess`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from dskd_ray.config import DSKDConfig
from dskd_ray.errors import CheckpointError, DataError, DSKDError
from dskd_ray.inference.scoring import resolve_device
from dskd_ray.io.data import decode_images, load_images, load_model_inputs
from dskd_ray.model.checkpoint import (
    Checkpoint,
    checkpoint_exists,
    load_checkpoint,
    make_checkpoint,
)
from dskd_ray.model.network import DSKD
from dskd_ray.progress import PROGRESS, clock, eta
from dskd_ray.training.calibration import baseline_sample, calibrate
from dskd_ray.training.dataset import (
    TrainingSet,
    epoch_order,
    plan_training,
    seed_everything,
    shard,
    split_holdout,
)
from dskd_ray.training.epoch import (
    FEATURE_STD_FLOOR,
    EpochStats,
    ProgressCallback,
    Students,
    TeacherCache,
    fit_feature_statistics,
    hard_mining_share,
    make_optimizer,
    make_scheduler,
    run_epoch,
    train_step,
)
from dskd_ray.training.memory import fit_memory
from dskd_ray.training.strategy import OneProcess, Strategy

# This module's own names, and those tests and benches import from here that moved to its
# parts in the split (issue 23).
__all__ = [
    "FEATURE_STD_FLOOR",
    "EpochStats",
    "Students",
    "TeacherCache",
    "TrainResult",
    "add_memory",
    "calibrate",
    "epoch_order",
    "fit",
    "fit_feature_statistics",
    "hard_mining_share",
    "make_optimizer",
    "plan_training",
    "check_resumed_data",
    "resume_config",
    "run_epoch",
    "shard",
    "split_holdout",
    "train",
    "train_step",
]

log = logging.getLogger(__name__)


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


def resume_config(
    requested: DSKDConfig, state: Checkpoint, asked: Collection[str] | None = None
) -> DSKDConfig:
    """A resumed run's config: its own; only the epoch budget may grow.

    The fields in `asked` (every field when None: a whole config was given) must be the run's
    own, or it is refused in one line: a resumed run used to keep its first config in silence,
    whatever the command asked for."""
    names = [f.name for f in dataclasses.fields(DSKDConfig)] if asked is None else list(asked)
    saved = state.config
    differ = [k for k in names if k != "epochs" and getattr(requested, k) != getattr(saved, k)]
    if differ:
        asked_for = ", ".join(f"{k}={getattr(requested, k)}" for k in differ)
        trained = ", ".join(f"{k}={getattr(saved, k)}" for k in differ)
        raise CheckpointError(
            f"--resume: the interrupted run was trained with {trained}, not {asked_for}: "
            "resume with its own options, or start a new run (a new --out; on Ray a new "
            "--run-name)"
        )
    return saved.replace(epochs=max(requested.epochs, saved.epochs))


def check_resumed_data(images: TrainingSet, state: Checkpoint) -> None:
    """A resumed run trains on the images its first epochs trained on, split the same way."""
    saved = (state.training or {}).get("data_fingerprint")
    if saved is not None and saved != images.fingerprint:
        raise DataError(
            f"--resume: the images under {images.data} are not those the interrupted run "
            f"trained on (under {state.meta.get('data', 'its data')}, split the same way): "
            "resume on its own data, or start a new run (a new --out; on Ray a new --run-name)"
        )


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
    model.config = config  # a resumed run's own, with its epoch budget perhaps grown
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
    training = {"epoch": 0, "history": [], "resumed_at": [], "data_fingerprint": images.fingerprint}
    if config.has_students:
        training = _train_students(
            model, config, train_images, int(longest), strategy, device, state, meta,
            on_progress, on_epoch, images.fingerprint,
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
    data_fingerprint: str,
) -> dict[str, Any]:
    """The epochs: this worker's `train_images` (each worker walks `length` of them an epoch),
    from `state` if it is an unfinished run. Returns the training record (epoch, history,
    resumed_at, the data's fingerprint) the final checkpoint keeps."""
    rank, world = strategy.rank, strategy.world
    cuda = device.type == "cuda"
    autocast = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    student_forward = strategy.wrap(Students(model), device)
    per_worker = config.batch_size // world  # config.batch_size is the global batch
    worker_config = config.replace(batch_size=per_worker)
    training = (state.training or {}) if state is not None else {}
    start_epoch = int(training.get("epoch", 0))
    cache = None
    need = TeacherCache.bytes_needed(model, len(train_images), config.image_size)
    if need <= config.teacher_cache_mb * 2**20 and start_epoch < config.epochs:
        cache = TeacherCache.build(model, train_images, device, per_worker)
    if config.feature_norm == "standardize" and state is None:  # a resumed run has its own
        fit_feature_statistics(
            model, train_images, cache, device, per_worker, lambda v: strategy.all_reduce(v)
        )

    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, math.ceil(length / per_worker))
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
        progress = {
            "epoch": epoch + 1, "history": history, "resumed_at": resumed_at,
            "data_fingerprint": data_fingerprint,
        }  # fmt: skip

        def resumable(progress: dict[str, Any] = progress) -> Checkpoint:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            return make_checkpoint(model, None, {**progress, **state}, meta)

        strategy.checkpoint(epoch + 1, stats, epoch + 1 == config.epochs, resumable)
    return {
        "epoch": config.epochs, "history": history, "resumed_at": resumed_at,
        "data_fingerprint": data_fingerprint,
    }  # fmt: skip


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
        threshold, calibration = calibrate(model, sample, holdout, config, device)
        # The finished checkpoint drops the optimizer state: scoring actors load it, and Adam's
        # moments would triple its size.
        done = {**training, "complete": True}
        final_meta = {
            **meta, **calibration, "n_holdout": len(holdout),
            "skipped": skipped + holdout_skipped,
        }  # fmt: skip
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
    unchanged = ("memory", "memory_size", "memory_sampling", "memory_weight", "memory_weight_fit")
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
    asked: Collection[str] | None = None,
) -> TrainResult:
    """Train on the normal images under `data` in this process; write the checkpoint to `out`
    every epoch (`resume=True` continues an interrupted run from there, on the same images,
    with the config fields in `asked` — all of them by default — the same as the run's)."""
    dev = resolve_device(device)
    state: Checkpoint | None = None
    if resume and checkpoint_exists(out):
        state = load_checkpoint(out)
        if state.training is None or state.training.get("complete"):
            raise CheckpointError(
                f"{out} is a finished run: nothing to resume (train to a new --out)"
            )
        config = resume_config(config, state, asked)
        log.info("resuming %s", out)
    images = plan_training(data, config)
    if state is not None:
        check_resumed_data(images, state)
    final = fit(config, images, OneProcess(out), dev, state, None, on_progress, on_epoch)
    assert final is not None
    return TrainResult.from_checkpoint(final)
