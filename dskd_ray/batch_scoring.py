"""Moved to `dskd_ray.nightly.run` (issue 23). This old path stays for one release, then goes."""

import warnings

from dskd_ray.config import (
    ScoringOptions,
)
from dskd_ray.nightly.run import (
    LISTING_CHUNK,
    LISTING_SCHEMA,
    MANIFEST_COLUMNS,
    DryRunSummary,
    PoolPlan,
    RunSummary,
    ScoringActor,
    ScoringRunError,
    decode_batch,
    dry_run,
    ensure_ray,
    is_manifest,
    list_inputs,
    plan_pool,
    read_manifest,
    score_images,
    write_maps_batch,
)

__all__ = [
    "DryRunSummary",
    "LISTING_CHUNK",
    "LISTING_SCHEMA",
    "MANIFEST_COLUMNS",
    "PoolPlan",
    "RunSummary",
    "ScoringActor",
    "ScoringOptions",
    "ScoringRunError",
    "decode_batch",
    "dry_run",
    "ensure_ray",
    "is_manifest",
    "list_inputs",
    "plan_pool",
    "read_manifest",
    "score_images",
    "write_maps_batch",
]

warnings.warn(
    "dskd_ray.batch_scoring moved to dskd_ray.nightly.run; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
