"""Moved to `dskd_ray.inference.scoring` (issue 23). This old path stays for one release, then goes."""

import warnings

from dskd_ray.inference.scoring import (
    BatchScorer,
    ModelScorer,
    Scorer,
    ScoreResult,
    not_finite_reason,
    resolve_device,
)
from dskd_ray.model.inputs import images_to_tensor

__all__ = [
    "BatchScorer",
    "ModelScorer",
    "ScoreResult",
    "Scorer",
    "images_to_tensor",
    "not_finite_reason",
    "resolve_device",
]

warnings.warn(
    "dskd_ray.scoring moved to dskd_ray.inference.scoring; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
