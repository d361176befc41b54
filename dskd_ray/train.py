"""Moved to `dskd_ray.training` (issue 23): the routine in `loop`, its parts beside it. This old
path stays for one release, then goes."""

import warnings

from dskd_ray.training.calibration import (
    BASELINE_IMAGES,
    baseline_sample,
    compute_threshold,
    fit_level_statistics,
    fit_memory_gain,
    fit_pixel_baseline,
    image_scores,
    model_rows,
)
from dskd_ray.training.dataset import (
    TrainingSet,
    seed_everything,
)
from dskd_ray.training.epoch import (
    SGD_MOMENTUM,
    Progress,
    ProgressCallback,
    decoder_reads_teacher,
    iterate_batches,
    make_scheduler,
)
from dskd_ray.training.loop import (
    FEATURE_STD_FLOOR,
    EpochStats,
    Students,
    TeacherCache,
    TrainResult,
    add_memory,
    calibrate,
    epoch_order,
    fit,
    fit_feature_statistics,
    hard_mining_share,
    make_optimizer,
    plan_training,
    resume_config,
    run_epoch,
    shard,
    split_holdout,
    train,
    train_step,
)
from dskd_ray.training.memory import (
    fit_memory,
    memory_candidates,
    memory_seed,
)
from dskd_ray.training.strategy import (
    OneProcess,
    Strategy,
)

__all__ = [
    "BASELINE_IMAGES",
    "EpochStats",
    "FEATURE_STD_FLOOR",
    "OneProcess",
    "Progress",
    "ProgressCallback",
    "SGD_MOMENTUM",
    "Strategy",
    "Students",
    "TeacherCache",
    "TrainResult",
    "TrainingSet",
    "add_memory",
    "baseline_sample",
    "calibrate",
    "compute_threshold",
    "decoder_reads_teacher",
    "epoch_order",
    "fit",
    "fit_feature_statistics",
    "fit_level_statistics",
    "fit_memory",
    "fit_memory_gain",
    "fit_pixel_baseline",
    "hard_mining_share",
    "image_scores",
    "iterate_batches",
    "make_optimizer",
    "make_scheduler",
    "memory_candidates",
    "memory_seed",
    "model_rows",
    "plan_training",
    "resume_config",
    "run_epoch",
    "seed_everything",
    "shard",
    "split_holdout",
    "train",
    "train_step",
]

warnings.warn(
    "dskd_ray.train moved to dskd_ray.training.loop; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
