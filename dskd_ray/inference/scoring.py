"""The scoring core: decoded images in, anomaly maps and image scores out.

`evaluate`, `predict` and the Ray Data scoring job all call `Scorer.score_batch`, so every path
computes scores the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dskd_ray.config import PRECISIONS, DSKDConfig, check_device
from dskd_ray.errors import ConfigError
from dskd_ray.evaluation.metrics import is_anomalous
from dskd_ray.inference import tiling
from dskd_ray.model.checkpoint import Checkpoint, load_checkpoint
from dskd_ray.model.inputs import images_to_tensor
from dskd_ray.model.network import DSKD

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    check_device(device)  # "foo" is a ConfigError here, not torch's RuntimeError
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device")
    return dev


@dataclass
class ScoreResult:
    # (B, H, W) float32; with a tiled model, a list of each image's full-resolution map
    maps: np.ndarray | list[np.ndarray]
    scores: np.ndarray  # (B,) float32

    @property
    def finite(self) -> np.ndarray:
        """(B,) bool: the score and every pixel of the map are finite numbers.

        A NaN or inf comes from broken weights (or an overflow), never from a valid image; it
        compares as "not above the threshold", so unchecked it would read as a normal image.
        """
        maps_ok = np.array([np.isfinite(m).all() for m in self.maps], bool).reshape(-1)
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
    config: DSKDConfig

    @property
    def tiled(self) -> bool:
        return self.config.tiled

    @property
    def decode_size(self) -> int | None:
        """What images are decoded to for this model: its input size, or None (full
        resolution) for a tiled model."""
        return None if self.config.tiled else self.image_size

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

    def score_images(self, images: Sequence[np.ndarray]) -> ScoreResult:
        """Decoded uint8 (H, W, 3) images as `decode_size` gives them: at the model's size
        (scored as one batch) or, for a tiled model, at any size — cut into tiles, the tiles
        scored `batch_size` at a time across images, each image's tile maps stitched into its
        full-resolution map and its score taken from that map (docs/design.md §8)."""
        if not self.tiled:
            if not len(images):
                return self.score_batch(
                    np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
                )
            return self.score_batch(np.stack(images))
        tile, overlap = self.image_size, self.config.tile_overlap
        cuts = [tiling.cut(np.asarray(image), tile, overlap) for image in images]
        if not cuts:
            return ScoreResult([], np.zeros((0,), np.float32))
        tile_maps = self.score_batch(np.concatenate([tiles for tiles, _ in cuts])).maps
        maps, scores, at = [], [], 0
        for tiles, grid in cuts:
            full = tiling.stitch(tile_maps[at : at + len(tiles)], grid)
            at += len(tiles)
            maps.append(full)
            scores.append(tiling.top_k_score(full, self.config.score_top_k))
        return ScoreResult(maps, np.asarray(scores, np.float32))

    def is_anomalous(self, scores: np.ndarray) -> np.ndarray | None:
        return is_anomalous(scores, self.threshold)


class ModelScorer(BatchScorer):
    """A model in memory, as it is (training's calibration, benches): no checkpoint, and no
    threshold yet."""

    def __init__(self, model: DSKD, device: torch.device, batch_size: int) -> None:
        self.model, self.device, self.batch_size = model, device, batch_size
        self.config = model.config
        self.image_size = model.config.image_size
        self.threshold = None
        self.model_id = ""

    def _score_chunk(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.model.predict(images_to_tensor(images, self.device))
        return maps.float().cpu().numpy(), scores.float().cpu().numpy()


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
        self.checkpoint.require_finished(None if isinstance(checkpoint, Checkpoint) else checkpoint)
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
        self.config = self.checkpoint.config
        self.image_size = self.config.image_size
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
