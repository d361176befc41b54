"""The typed options, each owning its defaults: `DSKDConfig` (the model and its training; saved in
every checkpoint), `RayOptions` (how training runs on Ray Train), `ScoringOptions` (how bulk
scoring runs on Ray Data). Pure: no torch, no Ray, so the CLI reads them at once."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from dskd_ray.errors import ConfigError

BACKBONES: tuple[str, ...] = (
    "resnet18", "wide_resnet50_2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
)  # fmt: skip
STUDENTS: tuple[str, ...] = ("both", "se", "sd", "none")
MEMORIES: tuple[str, ...] = ("none", "knn")
MEMORY_SAMPLINGS: tuple[str, ...] = ("coreset", "random")
MEMORY_WEIGHT_FITS: tuple[str, ...] = ("synthetic", "none")
DF_INPUTS: tuple[str, ...] = ("se", "teacher")
LEVEL_FUSIONS: tuple[str, ...] = ("sum", "product")
LOSS_FORMS: tuple[str, ...] = ("pixel", "flat")
FEATURE_NORMS: tuple[str, ...] = ("none", "standardize")
# Which teacher levels are distilled, by stride (docs/design.md §1, §3).
PYRAMIDS: dict[str, tuple[int, int, int]] = {"4-8-16": (4, 8, 16), "8-16-32": (8, 16, 32)}
ENCODER_STUDENTS: tuple[str, ...] = ("teacher", "resnet")
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
DISTANCES: tuple[str, ...] = ("cosine", "l2")
LEVEL_NORMALIZATIONS: tuple[str, ...] = ("none", "mean", "standardize")
MAP_BASELINES: tuple[str, ...] = ("none", "mean", "subtract")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
BACKENDS: tuple[str, ...] = ("auto", "torch", "onnxruntime")
# 4096² is 16x the default's pixels, and the map arithmetic and activations grow with them; a
# larger size only finds the end of the memory, slowly.
MAX_IMAGE_SIZE = 4096
# The largest counts the options take. Past them a run could only fail late (an allocation, an
# overflow: `--batch-size 99999999999999999999` used to start a night and fail in it), so they
# are refused at once, when the options are read.
MAX_BATCH_SIZE = 4096
MAX_EPOCHS = 100_000
MAX_MEMORY_SIZE = 1_000_000  # patches: 0.6 GB of Lite0 bank, 1.5 GB of ResNet18's
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes no more
MAX_WORKERS = 10_000  # Ray Train workers, scoring actors, restarts
MAX_THREADS = 1024
MAX_ROWS_PER_FILE = 100_000_000
MAX_TOP = 1_000_000  # images `dskd results --top` lists
MAX_IN_PROCESS = 100_000
MAX_MODELS_PER_ACTOR = 1024
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(device: str) -> str:
    """`device` if it is one this library runs on (auto, cpu, cuda, cuda:N), else ConfigError.

    A pure check, no torch: the CLI calls it before it imports or starts anything.
    """
    if not _DEVICE.fullmatch(device):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda or cuda:N")
    return device


def input_fields(
    image_size: int | None, tile: int | None, tile_overlap: int | None
) -> dict[str, Any]:
    """The config fields for the model's input, from the options as given (None: not given):
    --image-size shrinks each image to it, --tile SIZE cuts images at full resolution into
    SIZE×SIZE tiles instead (that size is then the model's input)."""
    if tile is not None and image_size is not None:
        raise ConfigError("--tile SIZE sets the model's input size: drop --image-size")
    if tile_overlap is not None and tile is None:
        raise ConfigError("--tile-overlap needs --tile SIZE")
    if tile is not None and tile % 32:
        raise ConfigError(f"--tile {tile} must be a multiple of 32 (the model's input size)")
    return {
        "image_size": tile or image_size,
        "tiled": True if tile else None,
        "tile_overlap": tile_overlap,
    }


@dataclass
class DSKDConfig:
    """Everything that defines a model and how it was trained (docs/design.md §1, §3).

    `teacher_weights` is "imagenet", "random" (an untrained teacher: for tests and benches) or
    a local path / s3:// URI to a state dict. Model fields are enough to rebuild the network
    from a checkpoint alone.
    """

    # model
    backbone: str = "resnet18"
    teacher_weights: str = "imagenet"
    students: str = "both"
    df_input: str = "se"
    # The teacher's memory (docs/design.md §2, "The teacher's memory"): "knn" keeps a bank of
    # normal teacher patch features, fitted after the students, and adds each test patch's
    # distance to its nearest bank patch to the map as one more member; "none" does not.
    memory: str = "knn"
    # Patches in the bank, at most: the search costs image patches × bank size × channels per
    # image, so this is the scoring-cost knob (docs/design.md §2 for the measured bound).
    memory_size: int = 2048
    # How the bank is picked from the training patches: "coreset" (PatchCore's greedy
    # coreset: each pick the patch farthest from those picked) or "random".
    memory_sampling: str = "coreset"
    # The memory's share of the fused map; the students share the rest (docs/design.md §2).
    # ½: the students' view and the memory's weigh alike (members averaged equally gave the
    # memory ⅓ with two students: MTD seed 0, 0.795 vs 0.845 image AUROC; the demo the same).
    memory_weight: float = 0.5
    # How the memory's weight is set with students and a memory: "synthetic" picks it from
    # 0, 0.1 … 1 after training, by which fused map best separates synthetic defects pasted into
    # the held-out normal images (dskd_ray/training/memory_weight.py; the checkpoint keeps the
    # weight picked); "none" keeps `memory_weight` as given.
    memory_weight_fit: str = "synthetic"
    level_fusion: str = "sum"
    # How each student's level map is put on a common scale before the levels are fused, from
    # statistics of held-out normal images: "none" (raw 1 − cos), "mean" (÷ its normal mean),
    # "standardize" (÷ its normal standard deviation). Raw levels differ by up to 10× in scale,
    # so without it the noisiest level decides the map (docs/design.md §2).
    level_normalization: str = "standardize"
    # The final map's per-pixel mean over normal training images: "subtract" it (what is left,
    # cut at zero, is how far above its usual discrepancy a pixel is), divide by it ("mean"),
    # or keep the map ("none"). Padding makes the border rows of every image discrepant;
    # without a baseline the image score (the map's max) often lands there on normal images.
    # Subtracting, not dividing: division amplified quiet backgrounds and cost image AUROC on
    # three real object categories (docs/design.md §2).
    map_baseline: str = "subtract"
    # How teacher and student features are compared, in the loss and in the map alike
    # (docs/design.md §3): "standardize" first puts every teacher channel in units of its
    # spread over the training images (fitted once before training; applied to both sides), as
    # EfficientAD does; "distance" is "cosine" (1 − cos along channels, blind to magnitude) or
    # "l2" (the mean squared difference over channels).
    feature_norm: str = "none"
    distance: str = "cosine"
    # The teacher levels distilled, by stride: "4-8-16", or "8-16-32" (the teacher's trunk
    # runs on to stride 32; the DF code then stays at stride 32, the deepest level's size).
    pyramid: str = "4-8-16"
    # The encoder student: a fresh copy of the teacher's trunk ("teacher"), or a fresh
    # ResNet18-style network with a 1×1 read-out to the teacher's channels per level ("resnet").
    encoder_student: str = "teacher"
    image_size: int = 256
    # Tiling (docs/design.md §8): images are cut into image_size × image_size tiles at full
    # resolution, not shrunk to image_size; their maps are stitched into one map of the image.
    tiled: bool = False
    tile_overlap: int = 32  # pixels shared by neighbouring tiles, blended when stitched
    blur_sigma: float = 4.0
    # Image score: the map's maximum (1) or the mean of its `score_top_k` highest pixels.
    score_top_k: int = 1
    # training
    epochs: int = 50
    batch_size: int = 16
    # "adam" (with `betas`) or "sgd" (momentum 0.9, as STFPM: lr 0.4, weight_decay 1e-3).
    optimizer: str = "adam"
    lr: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float | None = 1.0
    # The distillation loss per level (docs/design.md §3): "flat", Reverse Distillation's own
    # loss, 1 − cos between each sample's whole flattened level map (the default since it
    # beat "pixel" with the memory on every set over 3 seeds, docs/results.md); "pixel", the
    # paper's mean over positions of 1 − cos along channels. Maps are per-pixel either way.
    # With distance="l2" the two are one loss: the mean squared difference.
    loss_form: str = "flat"
    # Hard-position mining: the gradients at the easiest `hard_mining` share of each level's
    # positions are scaled by 0.1, the share ramped in from 0 over the first tenth of the run.
    hard_mining: float = 0.0
    # Denoising students (DeSTSeg's idea): this share of each training batch gets synthetic
    # defects made from the training images themselves (`synthetic_defects.py`); the students
    # see them and are trained towards the teacher's features of the clean image.
    denoise: float = 0.0
    seed: int = 0
    holdout_fraction: float = 0.1
    threshold_quantile: float = 0.99
    # Teacher features are computed once and reused each epoch when they fit in this budget.
    teacher_cache_mb: int = 2048
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # JSON round trip gives a list
        self.validate()

    def validate(self) -> None:
        choices = {
            "backbone": BACKBONES,
            "students": STUDENTS,
            "memory": MEMORIES,
            "memory_sampling": MEMORY_SAMPLINGS,
            "memory_weight_fit": MEMORY_WEIGHT_FITS,
            "df_input": DF_INPUTS,
            "level_fusion": LEVEL_FUSIONS,
            "level_normalization": LEVEL_NORMALIZATIONS,
            "map_baseline": MAP_BASELINES,
            "lr_schedule": ("constant", "cosine"),
            "loss_form": LOSS_FORMS,
            "feature_norm": FEATURE_NORMS,
            "distance": DISTANCES,
            "pyramid": tuple(PYRAMIDS),
            "encoder_student": ENCODER_STUDENTS,
            "optimizer": OPTIMIZERS,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        if self.students == "none" and self.memory == "none":
            raise ConfigError(
                "--students none needs --memory knn: a model needs a student or a memory"
            )
        for name, most in (
            ("memory_size", MAX_MEMORY_SIZE), ("epochs", MAX_EPOCHS),
            ("batch_size", MAX_BATCH_SIZE), ("score_top_k", self.image_size**2),
        ):  # fmt: skip
            value = getattr(self, name)
            if not 1 <= value <= most:
                raise ConfigError(f"{name}={value} must be from 1 to {most}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed={self.seed} must be from 0 to {MAX_SEED}")
        if not 0.0 <= self.memory_weight <= 1.0:
            raise ConfigError(f"memory_weight={self.memory_weight} must be in [0, 1]")
        # Three stride-2 steps below the stride-16 level (the DF embedding) need a multiple of 32.
        if self.image_size < 64 or self.image_size % 32 or self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError(
                f"image_size={self.image_size} must be a multiple of 32, from 64 to "
                f"{MAX_IMAGE_SIZE}"
            )
        if not 0 <= self.tile_overlap <= self.image_size // 2:
            raise ConfigError(
                f"tile_overlap={self.tile_overlap} must be from 0 to half the tile "
                f"({self.image_size // 2})"
            )
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction={self.holdout_fraction} must be in [0, 1)")
        if not 0.0 < self.threshold_quantile <= 1.0:
            raise ConfigError(f"threshold_quantile={self.threshold_quantile} must be in (0, 1]")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be 0 or more")
        if not 0.0 <= self.hard_mining < 1.0:
            raise ConfigError(f"hard_mining={self.hard_mining} must be in [0, 1)")
        if not 0.0 <= self.denoise <= 1.0:
            raise ConfigError(f"denoise={self.denoise} must be in [0, 1]")
        if self.encoder_student != "teacher" and not self.uses_encoder_student:
            raise ConfigError(
                f"encoder_student={self.encoder_student!r} needs an encoder student: "
                "students both or se"
            )

    @property
    def strides(self) -> tuple[int, int, int]:
        """The pyramid's strides, shallowest first."""
        return PYRAMIDS[self.pyramid]

    @property
    def uses_encoder_student(self) -> bool:
        return self.students in ("both", "se")

    @property
    def uses_decoder_student(self) -> bool:
        return self.students in ("both", "sd")

    @property
    def has_students(self) -> bool:
        return self.students != "none"

    @property
    def has_memory(self) -> bool:
        return self.memory != "none"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DSKDConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> DSKDConfig:
        return dataclasses.replace(self, **changes)


# `dskd demo`'s recipe: the small backbone and a short schedule, so it runs in minutes on a CPU.
DEMO_CONFIG = DSKDConfig(backbone="efficientnet_lite0", epochs=12, batch_size=8)


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


@dataclass
class ScoringOptions:
    device: str = "auto"  # auto: GPU actors where the cluster has GPUs, else CPU actors
    batch_size: int = 32  # images per model call (and per decode task)
    actors: int | None = None  # most scoring actors; default from the cluster's resources
    actor_threads: int | None = None  # torch threads per CPU actor; default from the cluster
    rescore: bool = False  # score everything, even images this model already scored
    rows_per_file: int = 100_000  # Parquet rows per part file
    io_threads: int = 8  # concurrent object reads / writes inside one task
    precision: str = "fp32"  # "bf16": autocast in the actors (GPUs; CPUs with native bf16)
    compile: bool = False  # torch.compile the model in each actor
    # "torch", "onnxruntime" (the actors run the checkpoint's exported graph), or "auto": the
    # fastest measured path where it pays (`resolve_backend`).
    backend: str = "auto"
    run_id: str | None = None  # default: start time + random suffix
    # Up to this many images to score, with no Ray cluster named (--address, RAY_ADDRESS) or
    # already running, are scored in this process: a Ray start costs more than they do.
    in_process_max: int = 64
    # "auto" exports a model's graph for ONNX Runtime (once: then it is cached) only for a run
    # of at least this many images; fewer are scored sooner by torch than exported first.
    onnx_export_min: int = 500
    # URI schemes INPUT or a manifest may name besides local paths, file:// and s3:// (gs, az,
    # http…), each with its fsspec filesystem installed on every node.
    schemes: tuple[str, ...] = ()
    # A night of several models (`--models`, `--routes`): how many an actor keeps loaded. Its
    # blocks come model after model, so it loads each about once a night whatever this is; each
    # model kept costs its runtime's working memory (an ONNX Runtime session keeps its arena:
    # 0.5–2.2 GB at batch 32, 256²), so one (docs/design.md §6, Several models in one night).
    models_per_actor: int = 1

    def validate(self) -> None:
        """Refuse what cannot work before anything is listed or started (a Ray start is slow)."""
        check_device(self.device)
        for name, most in (
            ("batch_size", MAX_BATCH_SIZE), ("actors", MAX_WORKERS),
            ("actor_threads", MAX_THREADS), ("rows_per_file", MAX_ROWS_PER_FILE),
            ("io_threads", MAX_THREADS), ("models_per_actor", MAX_MODELS_PER_ACTOR),
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None and not 1 <= value <= most:
                flag = name.replace("_", "-")
                raise ConfigError(f"--{flag} {value} must be from 1 to {most}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.backend == "onnxruntime" and self.device.startswith("cuda"):
            raise ConfigError("--backend onnxruntime runs on CPUs: use --device cpu or auto")
        if self.backend == "onnxruntime" and (self.precision != "fp32" or self.compile):
            raise ConfigError(
                "--backend onnxruntime runs the exported float32 graph: "
                "--precision bf16 and --compile are PyTorch options"
            )
        if not 0 <= self.in_process_max <= MAX_IN_PROCESS:
            raise ConfigError(
                f"--in-process-max {self.in_process_max} must be from 0 to {MAX_IN_PROCESS}"
            )
        if self.onnx_export_min < 0:
            raise ConfigError(f"onnx_export_min={self.onnx_export_min} must be 0 or more")
        if self.schemes:
            from dskd_ray.io.storage import check_filesystem

            for scheme in self.schemes:
                check_filesystem(scheme)

    def resolve_backend(
        self, device: str, images: int, graph_cached: bool, onnx_installed: bool
    ) -> tuple[str, str]:
        """(the backend a run uses, why): `backend` unless it is "auto".

        "auto" is ONNX Runtime where it was measured fastest (docs/design.md §6: 4.9x PyTorch
        eager with the Lite0 teacher on a CPU, 1.3x with ResNet18): CPU actors, no PyTorch-only
        option asked for, the onnx extra installed, and the model's graph already cached or
        the run large enough to pay for its first export. Else PyTorch, eager unless --compile.
        """
        if self.backend != "auto":
            return self.backend, "asked for"
        if device.startswith("cuda"):
            return "torch", "GPU actors (the onnxruntime backend runs on CPUs)"
        if self.compile or self.precision != "fp32":
            return "torch", "--compile or --precision bf16 asked for (PyTorch options)"
        if not onnx_installed:
            return "torch", "onnxruntime not installed (pip install 'dskd_ray[onnx]')"
        if graph_cached:
            return "onnxruntime", "CPU actors; the model's graph is cached"
        if images < self.onnx_export_min:
            return "torch", (
                f"{images} images: fewer than the {self.onnx_export_min} that pay for "
                "exporting the model's graph first"
            )
        return "onnxruntime", f"CPU actors; {images} images pay for the graph's first export"
