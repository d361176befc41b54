"""Moved to `dskd_ray.evaluation.evaluate` (issue 23). This old path stays for one release, then goes."""

import warnings

from dskd_ray.evaluation.evaluate import (
    METRIC_KEYS,
    CategoryResult,
    evaluate_category,
    format_table,
    summarize,
)
from dskd_ray.io.data import (
    load_category,
)

__all__ = [
    "CategoryResult",
    "METRIC_KEYS",
    "evaluate_category",
    "format_table",
    "load_category",
    "summarize",
]

warnings.warn(
    "dskd_ray.evaluate moved to dskd_ray.evaluation.evaluate; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
