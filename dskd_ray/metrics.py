"""Moved to `dskd_ray.evaluation.metrics` (issue 23). This old path stays for one release, then goes."""

import warnings

from dskd_ray.evaluation.metrics import (
    PRO_FPR_LIMIT,
    aupro,
    f1_max,
    f1_optimal_threshold,
    image_auroc,
    is_anomalous,
    pixel_auroc,
    pro_curve,
    roc_curve,
)

__all__ = [
    "PRO_FPR_LIMIT",
    "aupro",
    "f1_max",
    "f1_optimal_threshold",
    "image_auroc",
    "is_anomalous",
    "pixel_auroc",
    "pro_curve",
    "roc_curve",
]

warnings.warn(
    "dskd_ray.metrics moved to dskd_ray.evaluation.metrics; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
