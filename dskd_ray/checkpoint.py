"""Moved to `dskd_ray.model.checkpoint` (issue 23). This old path stays for one release, then goes."""

import warnings

from dskd_ray.model.checkpoint import (
    FORMAT,
    MODEL_ID_FIELDS,
    OLDER_FORMATS,
    V1,
    V1_MODEL_ID_FIELDS,
    V2,
    V3,
    V3_MODEL_ID_FIELDS,
    V4,
    V4_DEFAULTS,
    V4_MODEL_ID_FIELDS,
    Checkpoint,
    Threshold,
    checkpoint_exists,
    compute_model_id,
    library_versions,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)

__all__ = [
    "Checkpoint",
    "FORMAT",
    "MODEL_ID_FIELDS",
    "OLDER_FORMATS",
    "Threshold",
    "V1",
    "V1_MODEL_ID_FIELDS",
    "V2",
    "V3",
    "V3_MODEL_ID_FIELDS",
    "V4",
    "V4_DEFAULTS",
    "V4_MODEL_ID_FIELDS",
    "checkpoint_exists",
    "compute_model_id",
    "library_versions",
    "load_checkpoint",
    "make_checkpoint",
    "save_checkpoint",
]

warnings.warn(
    "dskd_ray.checkpoint moved to dskd_ray.model.checkpoint; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
