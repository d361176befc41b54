"""Distributed training on Ray Train (v2 API): DDP over the students, one image shard per worker.

The only module besides `jobs/` that imports `ray.train`. Each worker runs the local trainer's
own routine, `loop.fit`, with `RayTrainStrategy`: its shard of the images, DDP over the
trainable parts, all-reduced epoch statistics, checkpoints reported to Ray Train. The teacher
stays frozen, in eval mode, outside DDP, on every worker. Rank 0 calibrates on the same images
a local run would (docs/design.md §6).

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
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dskd_ray.config import DSKDConfig, RayOptions
from dskd_ray.errors import ConfigError, DSKDError
from dskd_ray.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dskd_ray.model.network import DSKD
from dskd_ray.training.dataset import plan_training
from dskd_ray.training.epoch import EpochStats, Students
from dskd_ray.training.loop import TrainResult, check_resumed_data, fit, resume_config

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
EpochCallback = Callable[[int, EpochStats], None]


class DistributedTrainingError(DSKDError):
    """The Ray Train run failed after its retries."""


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


# --- the strategy: what a Ray Train worker does differently from one process ---------------------


def wrap_students(model: DSKD, device: torch.device) -> nn.Module:
    """DDP over the students when a process group is up; the plain students otherwise."""
    students = Students(model)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return students
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(students, device_ids=device_ids)


class RayTrainStrategy:
    """Rank and world from Ray Train; DDP over the students; gloo / NCCL collectives; rank 0
    reports a checkpoint every `checkpoint_every` epochs and the final one."""

    def __init__(self, rank: int, world: int, checkpoint_every: int) -> None:
        self.rank, self.world = rank, world
        self.checkpoint_every = checkpoint_every

    def wrap(self, students: Students, device: torch.device) -> nn.Module:
        return wrap_students(students.model, device)

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if not torch.distributed.is_initialized():
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(t, op=reduce_op[op])
        return t.cpu().tolist()

    def all_gather(self, obj: Any) -> list[Any]:
        if not torch.distributed.is_initialized():
            return [obj]
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out

    def checkpoint(
        self, epoch: int, stats: EpochStats, last: bool, make: Callable[[], Checkpoint]
    ) -> None:
        metrics = {"epoch": epoch, "loss": stats.loss, "images_per_s": stats.images_per_s}
        if epoch % self.checkpoint_every and not last:
            _report(metrics, None, None)  # every rank reports equally often
            return
        _report(metrics, make() if self.rank == 0 else None, f"epoch_{epoch:04d}")

    def finish(self, final: Checkpoint | None) -> None:
        epoch = final.training["epoch"] if final is not None and final.training else None
        _report({"epoch": epoch, "final": True}, final, "final")


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

    config, state = DSKDConfig.from_dict(loop["config"]), None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            state = load_checkpoint(Path(directory) / CHECKPOINT_FILE)
        if (state.training or {}).get("complete"):
            _finish_completed_run(state, rank, config.epochs, ctx.get_experiment_name())
            return
        # The same refusals as a local --resume: another config (bar --epochs) or other images.
        config = resume_config(config, state)
        check_resumed_data(loop["images"], state)
    meta = dict(loop["meta"])
    per_worker = config.batch_size // world
    meta["ray"] = {**meta["ray"], "workers": world, "per_worker_batch_size": per_worker}
    strategy = RayTrainStrategy(rank, world, int(loop["checkpoint_every"]))
    fit(config, loop["images"], strategy, device, state, meta, on_epoch=loop["on_epoch"])


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


def _setup_worker_logging() -> None:
    logger = logging.getLogger("dskd_ray")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("dskd: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


# --- the driver --------------------------------------------------------------------------------


def train_distributed(
    config: DSKDConfig,
    data: str,
    out: str,
    options: RayOptions,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train on Ray Train with `options.workers` workers; write the final checkpoint to `out`.

    The driver lists the images and splits off the held-out ones; workers decode their own
    shards (local paths must be visible to every node: use s3:// on a real cluster). `out`
    is written by this process (the driver) from the run's final reported checkpoint.
    `on_epoch(epoch, stats)` is shipped to the workers and runs on each after every epoch,
    before that epoch's checkpoint is reported (as in `train.train`).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    options.validate(config)
    images = plan_training(data, config)
    if len(images.train_uris) < options.workers:
        raise ConfigError(
            f"{len(images.train_uris)} training images for {options.workers} workers: "
            "use fewer workers"
        )
    run_name = options.run_name or default_run_name(config, data, out)
    storage_path = _resolve_storage(options.storage_path)
    use_gpu = options.gpus_per_worker > 0
    loop = {
        "config": config.to_dict(),
        "images": images,
        "torch_threads": options.cpus_per_worker,
        "checkpoint_every": options.checkpoint_every,
        "on_epoch": on_epoch,
        "meta": {
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
    return TrainResult.from_checkpoint(final)


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
