"""Moved to `dskd_ray.nightly.run` and its neighbours listing, plan, pool, stages (issue 23).
This old path stays for one release, then goes."""

import warnings

from dskd_ray.config import ScoringOptions
from dskd_ray.nightly.listing import (
    LISTING_CHUNK,
    LISTING_SCHEMA,
    MANIFEST_COLUMNS,
    is_manifest,
    list_inputs,
    read_manifest,
)
from dskd_ray.nightly.plan import DryRunSummary, dry_run
from dskd_ray.nightly.pool import PoolPlan, ensure_ray, plan_pool
from dskd_ray.nightly.run import RunSummary, ScoringRunError, score_images
from dskd_ray.nightly.stages import ScoringActor, decode_batch, write_maps_batch

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
    "dskd_ray.batch_scoring moved to dskd_ray.nightly (run, listing, plan, pool, stages); "
    "the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
