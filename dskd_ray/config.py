"""One typed config for the model and its training; saved in every checkpoint."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from dskd_ray.errors import ConfigError

Backbone = Literal["resnet18", "wide_resnet50_2", "efficientnet_lite0"]
Students = Literal["both", "se", "sd"]
DFInput = Literal["se", "teacher"]
LevelFusion = Literal["sum", "product"]

BACKBONES: tuple[str, ...] = ("resnet18", "wide_resnet50_2", "efficientnet_lite0")
STUDENTS: tuple[str, ...] = ("both", "se", "sd")
DF_INPUTS: tuple[str, ...] = ("se", "teacher")
LEVEL_FUSIONS: tuple[str, ...] = ("sum", "product")
LEVEL_NORMALIZATIONS: tuple[str, ...] = ("none", "mean", "standardize")
MAP_BASELINES: tuple[str, ...] = ("none", "mean", "subtract")
# 4096² is 16x the default's pixels, and the map arithmetic and activations grow with them; a
# larger size only finds the end of the memory, slowly.
MAX_IMAGE_SIZE = 4096
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(device: str) -> str:
    """`device` if it is one this library runs on (auto, cpu, cuda, cuda:N), else ConfigError.

    A pure check, no torch: the CLI calls it before it imports or starts anything.
    """
    if not _DEVICE.fullmatch(device):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda or cuda:N")
    return device


@dataclass
class DSKDConfig:
    """Everything that defines a model and how it was trained (DESIGN §1).

    `teacher_weights` is "imagenet", "random" (tests only) or a local path / s3:// URI to a
    state dict. Model fields are enough to rebuild the network from a checkpoint alone.
    """

    # model
    backbone: str = "resnet18"
    teacher_weights: str = "imagenet"
    students: str = "both"
    df_input: str = "se"
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
    image_size: int = 256
    blur_sigma: float = 4.0
    # Image score: the map's maximum (1) or the mean of its `score_top_k` highest pixels.
    score_top_k: int = 1
    # training
    epochs: int = 50
    batch_size: int = 16
    lr: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float | None = 1.0
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
            "df_input": DF_INPUTS,
            "level_fusion": LEVEL_FUSIONS,
            "level_normalization": LEVEL_NORMALIZATIONS,
            "map_baseline": MAP_BASELINES,
            "lr_schedule": ("constant", "cosine"),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        # Three stride-2 steps below the stride-16 level (the DF embedding) need a multiple of 32.
        if self.image_size < 64 or self.image_size % 32 or self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError(
                f"image_size={self.image_size} must be a multiple of 32, from 64 to "
                f"{MAX_IMAGE_SIZE}"
            )
        if self.score_top_k < 1:
            raise ConfigError(f"score_top_k={self.score_top_k} must be at least 1")
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs} must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction={self.holdout_fraction} must be in [0, 1)")
        if not 0.0 < self.threshold_quantile <= 1.0:
            raise ConfigError(f"threshold_quantile={self.threshold_quantile} must be in (0, 1]")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive")

    @property
    def uses_encoder_student(self) -> bool:
        return self.students in ("both", "se")

    @property
    def uses_decoder_student(self) -> bool:
        return self.students in ("both", "sd")

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
