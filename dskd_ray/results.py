"""Moved to `dskd_ray.nightly.results` (issue 23). This old path stays for one release, then goes."""

import warnings

from dskd_ray.nightly.results import (
    GONE,
    GONE_UNSCORED,
    MANIFEST_FORMAT,
    MANIFESTS_DIR,
    MAPS_DIR,
    RESULT_SCHEMA,
    RESULTS_DIR,
    CommittedRun,
    DamagedRunError,
    PartWriter,
    commit_run,
    committed_runs,
    gone_rows,
    manifest_path,
    new_run_id,
    read_part,
    read_results,
    read_run_part,
    run_partition,
    utc_now,
)

__all__ = [
    "CommittedRun",
    "DamagedRunError",
    "GONE",
    "GONE_UNSCORED",
    "MANIFESTS_DIR",
    "MANIFEST_FORMAT",
    "MAPS_DIR",
    "PartWriter",
    "RESULTS_DIR",
    "RESULT_SCHEMA",
    "commit_run",
    "committed_runs",
    "gone_rows",
    "manifest_path",
    "new_run_id",
    "read_part",
    "read_results",
    "read_run_part",
    "run_partition",
    "utc_now",
]

warnings.warn(
    "dskd_ray.results moved to dskd_ray.nightly.results; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
