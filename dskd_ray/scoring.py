"""The scoring core: decoded images in, anomaly maps and image scores out.

`evaluate`, `predict` and the Ray Data scoring job all call `Scorer.score_batch`, so every path
computes scores the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from dskd_ray.checkpoint import Checkpoint, load_checkpoint
from dskd_ray.config import PRECISIONS, check_device
from dskd_ray.errors import ConfigError
from dskd_ray.metrics import is_anomalous
from dskd_ray.model import DSKD

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    check_device(device)  # "foo" is a ConfigError here, not torch's RuntimeError
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device")
    return dev


def images_to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float in [0, 1] on `device` (converted there: 4× less copy)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def compute_maps(
    model: DSKD,
    x: torch.Tensor,
    divide_baseline: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x in [0, 1], (B, 3, H, W) → maps (B, H, W), scores (B,): `DSKD.predict`."""
    return model.predict(x, divide_baseline, autocast_dtype)


@dataclass
class ScoreResult:
    maps: np.ndarray  # (B, H, W) float32
    scores: np.ndarray  # (B,) float32

    @property
    def finite(self) -> np.ndarray:
        """(B,) bool: the score and every pixel of the map are finite numbers.

        A NaN or inf comes from broken weights (or an overflow), never from a valid image; it
        compares as "not above the threshold", so unchecked it would read as a normal image.
        """
        maps_ok = np.isfinite(self.maps).reshape(len(self.maps), -1).all(axis=1)
        return np.isfinite(self.scores) & maps_ok


def not_finite_reason(score: float) -> str:
    """The error a row or a message gives for a score that is not a finite number."""
    return (
        f"score not finite (score {score}; NaN or inf in the map): the model's weights are "
        "broken; retrain or use another checkpoint"
    )


class BatchScorer:
    """Decoded uint8 images in, maps and scores out, in chunks of `batch_size`: what every
    backend shares. A backend sets the attributes and implements `_score_chunk`."""

    image_size: int
    batch_size: int
    threshold: float | None
    model_id: str

    def _score_chunk(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def score_batch(self, images: np.ndarray) -> ScoreResult:
        """images: (B, S, S, 3) uint8 RGB at the model's input size (see `decode_image`)."""
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected (B, {self.image_size}, {self.image_size}, 3) uint8, got {images.shape}"
            )
        maps_out, scores_out = [], []
        for start in range(0, len(images), self.batch_size):
            maps, scores = self._score_chunk(images[start : start + self.batch_size])
            maps_out.append(maps)
            scores_out.append(scores)
        if not maps_out:
            s = self.image_size
            return ScoreResult(np.zeros((0, s, s), np.float32), np.zeros((0,), np.float32))
        return ScoreResult(np.concatenate(maps_out), np.concatenate(scores_out))

    def is_anomalous(self, scores: np.ndarray) -> np.ndarray | None:
        return is_anomalous(scores, self.threshold)


class Scorer(BatchScorer):
    """A checkpoint loaded once, ready to score batches of decoded images.

    The fast path: `channels_last` weights and inputs (on by default: +63% on this project's
    reference CPU, the same scores to float rounding); `precision="bf16"` autocast (fast on GPUs
    and on CPUs with native bf16, 8x slower on others; scores move by ~1e-2, so it is opt-in);
    `compile=True` compiles the network in place (`nn.Module.compile`) (~2x on the reference CPU too, after
    ~40 s of compiling: worth it for long runs).
    """

    def __init__(
        self,
        checkpoint: Checkpoint | str,
        device: str = "auto",
        batch_size: int = 16,
        channels_last: bool = True,
        precision: str = "fp32",
        compile: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
        self.checkpoint = (
            checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        )
        self.device = resolve_device(device)
        self.model = self.checkpoint.build_model().to(self.device).eval()
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        if compile:
            # The network compiled in place (its forward), not `predict`: a compiled bound
            # method run under inference_mode broke autograd state for the whole process.
            self.model.compile()
        self.predict = self.model.predict
        self.batch_size = batch_size
        self.image_size = self.checkpoint.config.image_size
        threshold = self.checkpoint.threshold
        self.threshold: float | None = threshold.value if threshold else None
        self.model_id = self.checkpoint.model_id

    def _score_chunk(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = images_to_tensor(images, self.device)
        # images_to_tensor's NHWC→NCHW permute already has channels_last strides.
        x = x.contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )
        maps, scores = self.predict(x, autocast_dtype=self.autocast_dtype)
        return maps.float().cpu().numpy(), scores.float().cpu().numpy()
