"""Distributed training on Ray Train (v2 API): DDP over the students, one image shard per worker.

The only module besides `jobs/` that imports `ray.train`. Each worker runs the local trainer's
own step (`train.run_epoch` → `train.train_step`) with a DDP wrapper of the trainable parts as
its `student_forward`; the teacher stays frozen, in eval mode, outside DDP, on every worker.

Batch size and learning rate: `config.batch_size` is the *global* batch (images per optimizer
step, summed over workers). Each worker takes `batch_size // workers` images a step, so one
step and one epoch mean the same thing as in a local run and the learning rate needs no
change when the number of workers changes (a run may even resume on a different number of
workers). To use more hardware per step, raise `batch_size` yourself and scale `lr` with it
(linearly for small changes; √k is safer with Adam for large ones) — that is a new recipe.
BatchNorm in the students normalises over each worker's own images (no SyncBatchNorm: it is
CUDA-only), so keep the per-worker batch at 8 or more.

Devices: CPU workers use gloo; GPU workers (one whole GPU each) use NCCL, bf16 autocast,
channels_last and pinned host memory for their shard.

Storage and resume: every `checkpoint_every` epochs rank 0 reports a checkpoint (this
package's format, with optimizer and scheduler state) to `<storage_path>/<run_name>/`.
A worker that dies is replaced and all workers restart from the latest reported checkpoint
(`FailureConfig(max_failures)`); running the same job again with the same storage path and run
name resumes from there too (Train v2 does that by itself for a second `fit()`). The default
run name is derived from the data, the output and the config (epochs excepted), so re-running
the same command resumes and changing a hyperparameter starts a new run; re-running a finished
run hands back its final checkpoint without training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dskd_ray.checkpoint import Checkpoint, load_checkpoint, make_checkpoint, save_checkpoint
from dskd_ray.config import DSKDConfig
from dskd_ray.data import load_images, training_images
from dskd_ray.errors import ConfigError, DataError, DSKDError
from dskd_ray.model import DSKD
from dskd_ray.train import (
    EpochStats,
    Students,
    TeacherCache,
    TrainResult,
    calibrate,
    make_optimizer,
    make_scheduler,
    run_epoch,
    seed_everything,
    split_holdout,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
# Test hook: "RANK:EPOCH:MARKER" makes worker RANK die (os._exit) once, right after the
# checkpoint of EPOCH is committed; the MARKER file (created then) keeps it from firing again.
FAULT_ENV = "DSKD_FAULT_KILL_WORKER"


class DistributedTrainingError(DSKDError):
    """The Ray Train run failed after its retries."""


@dataclass
class RayOptions:
    """How to run on Ray: resources, storage, checkpointing and fault tolerance."""

    workers: int
    gpus_per_worker: float = 0.0  # 0: CPU workers (gloo); ≥ 1: one CUDA device each (NCCL)
    cpus_per_worker: int = 1  # also the torch threads per worker (Ray sets OMP_NUM_THREADS=1)
    address: str | None = None  # Ray cluster to join; None: RAY_ADDRESS, or a local Ray
    storage_path: str | None = None  # local dir or s3://…; None: Ray's ~/ray_results
    run_name: str | None = None  # None: derived from data, out and config (see module doc)
    checkpoint_every: int = 1  # epochs between reported checkpoints (the last always is)
    keep_checkpoints: int = 2  # CheckpointConfig(num_to_keep)
    max_failures: int = 3  # FailureConfig(max_failures): worker-group restarts allowed

    def validate(self, config: DSKDConfig) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: must be at least 1")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 1:
            raise ConfigError("--gpus-per-worker must be ≥ 0 and --cpus-per-worker ≥ 1")
        if 0 < self.gpus_per_worker < 1:
            raise ConfigError(
                f"--gpus-per-worker {self.gpus_per_worker}: NCCL needs a whole GPU per worker"
            )
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("--checkpoint-every and --keep-checkpoints must be at least 1")
        if config.batch_size % self.workers:
            raise ConfigError(
                f"--batch-size {config.batch_size} is the global batch and must divide evenly "
                f"over {self.workers} workers: use a multiple of {self.workers}"
            )


def default_run_name(config: DSKDConfig, data: str, out: str) -> str:
    """Same command → same name (so a re-run resumes); another config → another run."""
    fields = {k: v for k, v in config.to_dict().items() if k != "epochs"}
    blob = json.dumps({"data": data, "out": out, "config": fields}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(out.rstrip("/")).stem).strip("-") or "model"
    return f"dskd-{stem}-{digest}"


def _resolve_storage(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


# --- pieces the worker loop is made of (pure torch: the DDP test calls them directly) ----------


def wrap_students(model: DSKD, device: torch.device) -> nn.Module:
    """DDP over the students when a process group is up; the plain students otherwise."""
    students = Students(model)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return students
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(students, device_ids=device_ids)


def shard(items: list[str], rank: int, world: int) -> list[str]:
    """Rank r's share of the images: every world-th one, starting at r."""
    return items[rank::world]


def shard_epoch_order(n: int, length: int, seed: int, epoch: int, rank: int) -> np.ndarray:
    """This rank's order for one epoch: a shuffle of its n images, repeated to `length`.

    Every rank walks the same number of steps with the same batch size (DDP's all-reduce needs
    it), so shorter shards wrap around, as torch's DistributedSampler pads. A pure function of
    (seed, epoch, rank): a resumed or restarted worker sees the same order.
    """
    return np.resize(np.random.default_rng([seed, epoch, rank]).permutation(n), length)


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    if not torch.distributed.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
    torch.distributed.all_reduce(t, op=reduce_op[op])
    return t.cpu().tolist()


def _all_gather(obj: Any) -> list[Any]:
    if not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# --- the per-worker loop -----------------------------------------------------------------------


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """What every Ray Train worker runs. `loop` comes from `train_distributed`."""
    import ray.train
    import ray.train.torch

    _setup_worker_logging()
    # DDP's hint about 1×1-conv gradient strides on CPU: harmless there, and noisy.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(loop["torch_threads"]))  # Ray sets OMP_NUM_THREADS=1
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    amp = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None

    requested = DSKDConfig.from_dict(loop["config"])
    config, state = requested, None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            state = load_checkpoint(Path(directory) / CHECKPOINT_FILE)
        # As in a local --resume: the run's own config wins; only the epoch budget may grow.
        config = state.config.replace(epochs=max(requested.epochs, state.config.epochs))
        if rank == 0 and config.replace(epochs=1) != requested.replace(epochs=1):
            log.warning(
                "run %s: resuming with its saved config, not the one given",
                ctx.get_experiment_name(),
            )
    training = (state.training or {}) if state is not None else {}
    if training.get("complete"):
        _finish_completed_run(state, rank, requested.epochs, ctx.get_experiment_name())
        return

    seed_everything(config.seed)
    model = state.build_model() if state is not None else DSKD(config)
    # channels_last on every device: 2x the training step on the reference CPU (bench/train_step.py).
    model = model.to(device).to(memory_format=torch.channels_last)
    student_forward = wrap_students(model, device)

    # This worker's shard, decoded once; every rank takes the same number of steps.
    uris = shard(loop["train_uris"], rank, world)
    images, _, skipped = load_images(uris, config.image_size)
    longest, fewest = _all_reduce([len(images), -len(images)], "max")
    if -fewest < 1:
        raise DataError(f"a worker has no readable training images (shard of {len(uris)})")
    length = int(longest)
    per_worker = config.batch_size // world
    worker_config = config.replace(batch_size=per_worker)
    shard_images = torch.from_numpy(images)
    if cuda:
        shard_images = shard_images.pin_memory()
    cache = None
    if (
        TeacherCache.bytes_needed(model, len(images), config.image_size)
        <= config.teacher_cache_mb * 2**20
    ):
        cache = TeacherCache.build(model, shard_images, device, per_worker)

    optimizer = make_optimizer(model, config)
    steps_per_epoch = math.ceil(length / per_worker)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    start_epoch = 0
    history: list[dict[str, Any]] = list(training.get("history", []))
    resumed_at: list[int] = list(training.get("resumed_at", []))
    if state is not None and state.training is not None:
        optimizer.load_state_dict(state.training["optimizer"])
        scheduler.load_state_dict(state.training["scheduler"])
        start_epoch = int(state.training["epoch"])
        resumed_at.append(start_epoch)
        if rank == 0:
            log.info(
                "resuming at epoch %d of %d from the last checkpoint",
                start_epoch + 1,
                config.epochs,
            )

    meta = dict(loop["meta"])
    meta["ray"] = {**meta["ray"], "workers": world, "per_worker_batch_size": per_worker}
    fault = loop.get("fault")
    for epoch in range(start_epoch, config.epochs):
        order = shard_epoch_order(len(images), length, config.seed, epoch, rank)
        start = time.perf_counter()
        stats = run_epoch(
            model, optimizer, scheduler, shard_images, order, worker_config, device, cache,
            epoch + 1, None, student_forward, amp, channels_last=True,
        )  # fmt: skip
        loss_sum, seen = _all_reduce([stats.loss * stats.images, float(stats.images)])
        seconds = time.perf_counter() - start
        epoch_stats = EpochStats(loss_sum / max(seen, 1), int(seen), seconds)
        history.append(asdict(epoch_stats))
        if not math.isfinite(epoch_stats.loss):
            raise FloatingPointError(
                f"training diverged at epoch {epoch + 1} (loss {epoch_stats.loss})"
            )
        metrics = {
            "epoch": epoch + 1,
            "loss": epoch_stats.loss,
            "images_per_s": epoch_stats.images_per_s,
        }
        if rank == 0:
            log.info(
                "epoch %d/%d: loss %.4f, %.1f images/s over %d workers",
                epoch + 1, config.epochs, epoch_stats.loss, epoch_stats.images_per_s, world,
            )  # fmt: skip
        last = epoch + 1 == config.epochs
        if (epoch + 1) % int(loop["checkpoint_every"]) and not last:
            ray.train.report(metrics)  # every rank reports equally often
            continue
        ckpt = None
        if rank == 0:
            ckpt = make_checkpoint(
                model,
                None,
                {
                    "epoch": epoch + 1,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": history,
                    "resumed_at": resumed_at,
                },
                meta,
            )
        _report(metrics, ckpt, f"epoch_{epoch + 1:04d}")
        _maybe_inject_fault(fault, rank, epoch + 1)

    # Threshold once, on rank 0, from the held-out normal images (DESIGN §1).
    all_skipped = [s for part in _all_gather(skipped) for s in part]
    final = None
    if rank == 0:
        holdout, _, holdout_skipped = load_images(loop["holdout_uris"], config.image_size)
        all_skipped += holdout_skipped
        model = model.to(memory_format=torch.contiguous_format)
        threshold = calibrate(model, images, holdout, config, device)
        done = {
            "epoch": config.epochs,
            "complete": True,
            "history": history,
            "resumed_at": resumed_at,
        }
        final = make_checkpoint(model, threshold, done, {**meta, "skipped": all_skipped})
    _report({"epoch": config.epochs, "final": True}, final, "final")


def _finish_completed_run(state: Checkpoint, rank: int, epochs: int, run_name: str) -> None:
    """A re-run of a finished run: nothing to train; hand its final checkpoint back again."""
    epoch = state.training["epoch"] if state.training else None
    if rank == 0:
        log.info(
            "run %s already finished (epoch %s): returning its final checkpoint", run_name, epoch
        )
        if epoch is not None and epochs > epoch:
            log.warning(
                "run %s finished at epoch %d, so --epochs %d changes nothing: a finished run "
                "keeps no optimizer state; train again under a new --run-name",
                run_name, epoch, epochs,
            )  # fmt: skip
    # An automatic directory name: reusing "final" could let retention delete the new report.
    _report({"epoch": epoch, "final": True}, state if rank == 0 else None, None)


def _report(metrics: dict[str, Any], ckpt: Checkpoint | None, name: str | None) -> None:
    import ray.train

    if ckpt is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="dskd-ckpt-") as directory:
        save_checkpoint(ckpt, Path(directory) / CHECKPOINT_FILE)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=name,
        )


def _maybe_inject_fault(fault: dict[str, Any] | None, rank: int, epoch: int) -> None:
    """The fault test's hook (see FAULT_ENV): die like a crashed worker, once."""
    if not fault or fault["rank"] != rank or fault["epoch"] != epoch:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    import ray.train

    # Wait until the controller has committed this epoch's checkpoint, so the test knows
    # exactly where the run must resume from.
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
    )
    marker.write_text(f"killed rank {rank} after epoch {epoch}\n")
    log.warning("fault injection: worker rank %d exits after epoch %d", rank, epoch)
    logging.shutdown()
    os._exit(1)


def _setup_worker_logging() -> None:
    logger = logging.getLogger("dskd_ray")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("dskd: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _parse_fault(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        rank, epoch, marker = value.split(":", 2)
        return {"rank": int(rank), "epoch": int(epoch), "marker": marker}
    except ValueError:
        raise ConfigError(f"{FAULT_ENV}={value!r}: expected RANK:EPOCH:MARKER_PATH") from None


# --- the driver --------------------------------------------------------------------------------


def train_distributed(config: DSKDConfig, data: str, out: str, options: RayOptions) -> TrainResult:
    """Train on Ray Train with `options.workers` workers; write the final checkpoint to `out`.

    The driver lists the images and splits off the held-out ones; workers decode their own
    shards (local paths must be visible to every node: use s3:// on a real cluster). `out`
    is written by this process (the driver) from the run's final reported checkpoint.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    options.validate(config)
    name, uris = training_images(data)
    if len(uris) < 2:
        raise DataError(f"{data}: {len(uris)} training image(s); at least 2 are needed")
    train_idx, holdout_idx = split_holdout(len(uris), config.holdout_fraction, config.seed)
    if len(train_idx) < options.workers:
        raise ConfigError(
            f"{len(train_idx)} training images for {options.workers} workers: use fewer workers"
        )
    run_name = options.run_name or default_run_name(config, data, out)
    storage_path = _resolve_storage(options.storage_path)
    use_gpu = options.gpus_per_worker > 0
    loop = {
        "config": config.to_dict(),
        "train_uris": [uris[i] for i in train_idx],
        "holdout_uris": [uris[i] for i in holdout_idx],
        "torch_threads": options.cpus_per_worker,
        "checkpoint_every": options.checkpoint_every,
        "fault": _parse_fault(os.environ.get(FAULT_ENV)),
        "meta": {
            "data": data,
            "category": name,
            "n_train": len(train_idx),
            "n_holdout": len(holdout_idx),
            "ray": {
                "run_name": run_name,
                "storage_path": storage_path,
                "global_batch_size": config.batch_size,
            },
        },
    }
    if not ray.is_initialized():
        ray.init(address=options.address)
    resources = {"CPU": options.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = options.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=options.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=options.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
        ),
    )
    log.info("Ray Train run %r, storage %s", run_name, storage_path or "~/ray_results")
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise DistributedTrainingError(
            f"Ray Train run {run_name!r} failed ({_describe_failure(e)}). Fix the cause and run "
            "the same command again (same --storage-path and --run-name) to resume from its last "
            "checkpoint"
        ) from e
    if result.checkpoint is None:
        raise DistributedTrainingError(f"Ray Train run {run_name!r} reported no checkpoint")
    with result.checkpoint.as_directory() as directory:
        final = load_checkpoint(Path(directory) / CHECKPOINT_FILE)
    save_checkpoint(final, out)
    training = final.training or {}
    history = [EpochStats(**h) for h in training.get("history", [])]
    skipped = [tuple(s) for s in final.meta.get("skipped", [])]
    return TrainResult(final, history, skipped, len(train_idx), len(holdout_idx))


def _describe_failure(error: BaseException) -> str:
    """One line per failed worker (its exception's last line), not Ray's whole traceback."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        parts = []
        for rank, failure in sorted(failures.items()):
            lines = [ln for ln in str(failure).strip().splitlines() if ln.strip()]
            parts.append(f"rank {rank}: {lines[-1].strip() if lines else type(failure).__name__}")
        return "; ".join(parts)
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(error).__name__
