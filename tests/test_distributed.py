"""Ray Train (dskd_ray.training.distributed) on a real local Ray: DDP is right, a 2-worker run scores,
a dead worker is replaced, and a run resumes from its storage.

Tiny settings throughout: resnet18 with a random teacher, 64×64 images, a handful of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_bucket, write_textures
from dskd_ray.config import DSKDConfig
from dskd_ray.errors import ConfigError
from dskd_ray.model.checkpoint import load_checkpoint
from dskd_ray.model.network import DSKD
from dskd_ray.training.distributed import (
    DistributedTrainingError,
    RayOptions,
    default_run_name,
    train_distributed,
)
from dskd_ray.training.loop import EpochStats, Students, epoch_order, plan_training, shard, train


def _config(**changes: object) -> DSKDConfig:
    base = DSKDConfig(
        backbone="resnet18",
        teacher_weights="random",
        image_size=64,
        epochs=2,
        batch_size=4,
        holdout_fraction=0.2,
    )
    return base.replace(**changes)


# --- pure pieces ---------------------------------------------------------------------------


def test_shards_cover_the_images_once_and_orders_are_equal_length() -> None:
    items = [f"img{i}" for i in range(11)]
    shards = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(items)
    length = max(len(s) for s in shards)
    for rank, s in enumerate(shards):
        order = epoch_order(len(s), seed=0, epoch=2, rank=rank, world=3, length=length)
        assert len(order) == length and set(order) == set(range(len(s)))
        assert np.array_equal(order, epoch_order(len(s), 0, 2, rank, 3, length))  # resumable
    assert not np.array_equal(epoch_order(4, 0, 1, 0, 2), epoch_order(4, 0, 2, 0, 2))
    assert not np.array_equal(epoch_order(9, 0, 1, 0, 2), epoch_order(9, 0, 1, 1, 2))
    # One worker shuffles exactly as a local run.
    assert np.array_equal(epoch_order(9, 0, 1, 0, 1, 9), epoch_order(9, 0, 1))


def test_run_name_is_stable_and_follows_the_config_but_not_the_epochs() -> None:
    config = _config()
    name = default_run_name(config, "s3://b/data", "s3://b/models/bottle.pt")
    assert name.startswith("dskd-bottle-")
    assert name == default_run_name(
        config.replace(epochs=9), "s3://b/data", "s3://b/models/bottle.pt"
    )
    assert name != default_run_name(
        config.replace(lr=0.001), "s3://b/data", "s3://b/models/bottle.pt"
    )


def test_global_batch_must_split_evenly_over_workers() -> None:
    with pytest.raises(ConfigError, match="multiple of 3"):
        RayOptions(workers=3).validate(_config(batch_size=16))
    RayOptions(workers=4).validate(_config(batch_size=16))


def test_the_ddp_module_holds_the_students_and_not_the_teacher() -> None:
    model = DSKD(_config())
    students = Students(model)
    ids = {id(p) for p in students.parameters()}
    assert ids == {id(p) for p in model.student_parameters()}
    assert not ids & {id(p) for p in model.teacher.parameters()}
    assert not any(k.startswith("teacher") for k in students.state_dict())


# --- DDP correctness -------------------------------------------------------------------------


def _one_step_worker(loop: dict) -> None:
    """On each of 2 workers: one DDP step on this rank's half of a 2b batch, and in-process
    references on the whole batch. Writes max differences to loop["out"]/rank<r>.json."""
    import copy

    import ray.train

    from dskd_ray.model.loss import distillation_loss
    from dskd_ray.training.distributed import wrap_students
    from dskd_ray.training.loop import train_step

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    config = DSKDConfig.from_dict(loop["config"])
    b, lr = loop["b"], loop["lr"]
    torch.manual_seed(123)
    x_full = torch.rand(2 * b, 3, 64, 64)  # the same on both ranks: the shared data order
    mine = slice(rank * b, (rank + 1) * b)

    def fresh() -> DSKD:
        torch.manual_seed(0)
        return DSKD(config)

    def sgd(model: DSKD) -> torch.optim.Optimizer:
        # SGD, not Adam: Adam's first step is lr·sign(grad) and would hide a wrongly scaled
        # (summed instead of averaged) gradient.
        return torch.optim.SGD(model.student_parameters(), lr=lr)

    def students_state(model: DSKD, params_only: bool = False) -> dict[str, torch.Tensor]:
        named = dict(Students(model).named_parameters()) if params_only else None
        state = Students(model).state_dict()
        return {k: v.detach().clone() for k, v in state.items() if named is None or k in named}

    def max_diff(a: dict, c: dict) -> float:
        return max(float((a[k].float() - c[k].float()).abs().max()) for k in a)

    result: dict[str, float] = {}

    # (a) BatchNorm with fixed statistics (students in eval mode): the loss is a mean of
    #     per-image terms, so 2 workers × b must equal one process × 2b exactly.
    model = fresh()
    reference, alone = copy.deepcopy(model), copy.deepcopy(model)
    before = students_state(model)
    ddp = wrap_students(model, torch.device("cpu"))
    for m in (model, reference, alone):
        m.eval()
    x = model.normalize(x_full)
    train_step(model, sgd(model), x[mine], None, None, student_forward=ddp)
    train_step(reference, sgd(reference), x, None, None)
    train_step(alone, sgd(alone), x[mine], None, None)  # control: no gradient exchange
    after = students_state(model)
    result["fixed_bn_vs_2b"] = max_diff(after, students_state(reference))
    result["fixed_bn_update"] = max_diff(after, before)
    result["fixed_bn_control"] = max_diff(after, students_state(alone))
    result["fixed_bn_checksum"] = float(sum(v.double().sum() for v in after.values()))

    # (b) BatchNorm in training mode, as in real training, grad clipping on: each worker
    #     normalises by its own b images, so the single-process equivalent is the 2b batch
    #     as two BN groups of b ("ghost batches") with the mean of their losses.
    model = fresh()
    reference, one_group = copy.deepcopy(model), copy.deepcopy(model)
    ddp = wrap_students(model, torch.device("cpu"))
    for m in (model, reference, one_group):
        m.train()
    x = model.normalize(x_full)
    train_step(model, sgd(model), x[mine], None, 1.0, student_forward=ddp)
    optimizer = sgd(reference)
    optimizer.zero_grad()
    for half in (x[:b], x[b:]):
        teacher = reference.teacher_features(half)
        (distillation_loss(teacher, reference.student_features(half, teacher)) / 2).backward()
    torch.nn.utils.clip_grad_norm_(reference.student_parameters(), 1.0)
    optimizer.step()
    train_step(one_group, sgd(one_group), x, None, 1.0)  # control: one BN group of 2b
    after = students_state(model, params_only=True)
    result["train_bn_vs_ghost_2b"] = max_diff(after, students_state(reference, True))
    result["train_bn_control"] = max_diff(after, students_state(one_group, True))
    result["train_bn_checksum"] = float(sum(v.double().sum() for v in after.values()))

    Path(loop["out"], f"rank{rank}.json").write_text(json.dumps(result))


def test_ddp_step_on_two_workers_equals_one_process_with_the_double_batch(
    ray_cluster, tmp_path: Path
) -> None:
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
    trainer = TorchTrainer(
        _one_step_worker,
        train_loop_config={"config": _config().to_dict(), "b": 3, "lr": 0.5, "out": str(tmp_path)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(name="ddp-one-step", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["fixed_bn_update"] > 1e-3  # the step moved the weights
        assert r["fixed_bn_vs_2b"] < 2e-5, r
        assert r["fixed_bn_control"] > 100 * r["fixed_bn_vs_2b"], r
        assert r["train_bn_vs_ghost_2b"] < 2e-5, r
        assert r["train_bn_control"] > 100 * r["train_bn_vs_ghost_2b"], r
    # Both replicas hold the same weights after the step.
    assert ranks[0]["fixed_bn_checksum"] == pytest.approx(ranks[1]["fixed_bn_checksum"], rel=1e-9)
    assert ranks[0]["train_bn_checksum"] == pytest.approx(ranks[1]["train_bn_checksum"], rel=1e-9)


# --- real runs -------------------------------------------------------------------------------


def test_one_ray_worker_trains_and_calibrates_exactly_as_a_local_run(
    ray_cluster, tmp_path: Path
) -> None:
    """The same routine on both paths: same weights, same memory bank, same per-pixel baseline,
    same threshold."""
    data = tmp_path / "normal"
    write_textures(data, 10)
    config = _config(
        epochs=2, batch_size=4, level_normalization="mean", memory="knn", memory_size=100
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (cpus_per_worker=1): the same float sums
    try:
        local = train(config, str(data), str(tmp_path / "local.pt"), device="cpu").checkpoint
    finally:
        torch.set_num_threads(threads)
    ray = train_distributed(
        config,
        str(data),
        str(tmp_path / "ray.pt"),
        RayOptions(workers=1, storage_path=str(tmp_path / "runs"), run_name="one-worker"),
    ).checkpoint
    assert local.state_dict.keys() == ray.state_dict.keys()
    for key, value in local.state_dict.items():
        torch.testing.assert_close(ray.state_dict[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(local.state_dict["pixel_baseline"], torch.ones(64, 64))
    assert local.state_dict["memory.bank"].shape == (100, 128 + 256)
    assert local.meta["memory"]["candidates"] == ray.meta["memory"]["candidates"] == 8 * 64
    assert local.threshold is not None and ray.threshold is not None
    assert ray.threshold.value == pytest.approx(local.threshold.value, rel=1e-5)
    assert ray.threshold.normal_scores == pytest.approx(local.threshold.normal_scores, rel=1e-5)
    assert (ray.meta["n_train"], ray.meta["n_holdout"]) == (8, 2) == (
        local.meta["n_train"], local.meta["n_holdout"]
    )  # fmt: skip


def _kill_rank_1_once(at_epoch: int, marker: Path):  # noqa: ANN202 - an on_epoch callback
    """An `on_epoch` hook for the workers: rank 1 dies like a crashed worker at the end of
    `at_epoch` (before its report), once the previous epoch's checkpoint is committed, so the
    test knows exactly where the run must resume from. The marker keeps it from firing twice.
    A nested function: cloudpickle ships it by value (the workers cannot import tests/)."""

    def kill(epoch: int, stats: EpochStats) -> None:
        import logging
        import os

        import ray.train

        if epoch != at_epoch or ray.train.get_context().get_world_rank() != 1:
            return
        if marker.exists():
            return
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
        )
        marker.write_text(f"killed rank 1 at the end of epoch {epoch}\n")
        logging.shutdown()
        os._exit(1)

    return kill


def test_two_worker_training_from_s3_then_scoring(
    ray_cluster, s3_server: dict, tmp_path: Path
) -> None:
    """Workers read their shards from S3 (moto). Ray's storage stays local here: pyarrow's
    multipart uploads to moto fail intermittently when the machine is loaded."""
    import s3fs

    from dskd_ray.inference.scoring import Scorer

    make_bucket(s3_server, "dskd-train")
    fs = s3fs.S3FileSystem()
    paths = write_textures(tmp_path / "normal", 10)
    for p in paths:
        fs.put_file(str(p), f"dskd-train/normal/{p.name}")
    out = tmp_path / "model.pt"
    storage = tmp_path / "runs"
    config = _config(epochs=2, batch_size=4, memory="knn", memory_size=64)
    result = train_distributed(
        config,
        "s3://dskd-train/normal",
        str(out),
        RayOptions(workers=2, storage_path=str(storage), run_name="two-workers"),
    )
    assert result.n_train == 8 and result.n_holdout == 2
    assert [h.images for h in result.history] == [8, 8]
    ckpt = load_checkpoint(out)
    assert ckpt.training["complete"] and ckpt.training["epoch"] == 2
    assert ckpt.meta["ray"]["workers"] == 2 and ckpt.meta["ray"]["per_worker_batch_size"] == 2
    assert ckpt.threshold is not None and len(ckpt.threshold.normal_scores) == 2
    # The memory is picked from every worker's shard, not rank 0's: the bank holds patches of
    # images only worker 1 decoded.
    assert ckpt.meta["memory"] == {**ckpt.meta["memory"], "workers": 2, "candidates": 8 * 64}
    bank = ckpt.state_dict["memory.bank"].double()
    assert bank.shape == (64, 384)
    train_uris = plan_training("s3://dskd-train/normal", config).train_uris
    owner = {}
    for rank in range(2):
        names = [Path(u).name for u in shard(train_uris, rank, 2)]
        patches = _memory_patches(ckpt.build_model(), [tmp_path / "normal" / n for n in names])
        owner[rank] = torch.cdist(bank, patches).amin(dim=1)
    from_rank_1 = (owner[1] < 1e-4) & (owner[0] > 1e-2)
    from_rank_0 = (owner[0] < 1e-4) & (owner[1] > 1e-2)
    assert int(from_rank_1.sum()) >= 8 and int(from_rank_0.sum()) >= 8
    assert bool(((owner[0] < 1e-4) | (owner[1] < 1e-4)).all())  # every row is a training patch
    # One checkpoint per epoch (2 kept) and the final one, in the run's storage folder.
    listed = {p.name for p in (storage / "two-workers").iterdir()}
    assert {"epoch_0002", "final"} <= listed
    assert (
        load_checkpoint(storage / "two-workers" / "epoch_0002" / "model.pt").training["epoch"] == 2
    )

    # The same command again: the finished run hands back its final model, no retraining.
    again = train_distributed(
        config,
        "s3://dskd-train/normal",
        str(tmp_path / "again.pt"),
        RayOptions(workers=2, storage_path=str(storage), run_name="two-workers"),
    )
    assert again.checkpoint.model_id == ckpt.model_id
    assert again.checkpoint.training["resumed_at"] == []  # it never trained again

    scorer = Scorer(str(out), device="cpu")
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[:3]])
    scored = scorer.score_batch(images)
    assert scored.maps.shape == (3, 64, 64) and np.isfinite(scored.scores).all()
    assert scorer.threshold == pytest.approx(ckpt.threshold.value)


def _memory_patches(model: DSKD, paths: list[Path]) -> torch.Tensor:
    """(n·64, 384) float64: the memory patches of 64² images, as the model computes them."""
    from dskd_ray.model.anomaly_map import memory_features
    from dskd_ray.model.inputs import images_to_tensor

    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        x = model.normalize(images_to_tensor(images, torch.device("cpu")))
        patches = memory_features(model.teacher_features(x), model.config.strides)
    return patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1]).double()


def test_dead_worker_is_replaced_and_a_rerun_resumes(ray_cluster, tmp_path: Path) -> None:
    data = tmp_path / "normal"
    write_textures(data, 8)
    config = _config(epochs=3, batch_size=4, holdout_fraction=0.25)
    storage = str(tmp_path / "runs")

    # 1) Worker rank 1 dies after epoch 1's checkpoint and no retry is allowed: the run fails,
    #    as if the job's driver had died, leaving epoch 1 in storage.
    options = RayOptions(workers=2, storage_path=storage, run_name="faulty", max_failures=0)
    kill = _kill_rank_1_once(2, tmp_path / "killed-1")
    with pytest.raises(DistributedTrainingError, match="resume"):
        train_distributed(config, str(data), str(tmp_path / "m.pt"), options, on_epoch=kill)
    assert (tmp_path / "killed-1").exists()
    assert load_checkpoint(Path(storage, "faulty", "epoch_0001", "model.pt")).training["epoch"] == 1

    # 2) The same run again (same storage and name), now with retries allowed; rank 1 dies
    #    again after epoch 2. The run resumes at epoch 2 from storage, the replaced worker
    #    group resumes at epoch 3 from epoch 2's checkpoint, and the run finishes. (Two
    #    retries, not one: on a loaded 2-core machine a worker group can miss Ray's 60 s
    #    start timeout, which costs a retry without running any training.)
    options = RayOptions(workers=2, storage_path=storage, run_name="faulty", max_failures=2)
    kill = _kill_rank_1_once(3, tmp_path / "killed-2")
    result = train_distributed(config, str(data), str(tmp_path / "m.pt"), options, on_epoch=kill)
    assert (tmp_path / "killed-2").exists()
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt.training["resumed_at"][:2] == [1, 2]  # never restarted from zero
    assert all(epoch >= 2 for epoch in ckpt.training["resumed_at"][1:])
    assert len(result.history) == 3 and ckpt.training["epoch"] == 3
    assert ckpt.threshold is not None


def test_ray_only_options_without_workers_are_a_one_line_error(tmp_path: Path) -> None:
    import subprocess

    write_textures(tmp_path / "normal", 2)
    done = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "train", str(tmp_path / "normal"),
         "--out", str(tmp_path / "m.pt"), "--run-name", "x"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "dskd: error: --address, --storage-path, --run-name and --gpus-per-worker need --workers N"
    )
