"""Moved to `dskd_ray.onnx.export` (issue 23). This old path stays for one release, then goes."""

import warnings

from dskd_ray.onnx.export import (
    MAP_TOLERANCE,
    SCORE_TOLERANCE,
    ExportCheck,
    ExportResult,
    ScoringGraph,
    cached_graph,
    check_export_target,
    check_images,
    compare,
    export_graph,
    export_onnx,
    graph_cache_path,
    graph_metadata,
    relative_error,
)
from dskd_ray.onnx.graph import (
    INPUT_NAME,
    METADATA,
    OUTPUT_NAMES,
    ExportError,
    onnx_installed,
    read_metadata,
    with_metadata,
)

__all__ = [
    "ExportCheck",
    "ExportError",
    "ExportResult",
    "INPUT_NAME",
    "MAP_TOLERANCE",
    "METADATA",
    "OUTPUT_NAMES",
    "SCORE_TOLERANCE",
    "ScoringGraph",
    "cached_graph",
    "check_export_target",
    "check_images",
    "compare",
    "export_graph",
    "export_onnx",
    "graph_cache_path",
    "graph_metadata",
    "onnx_installed",
    "read_metadata",
    "relative_error",
    "with_metadata",
]

warnings.warn(
    "dskd_ray.export moved to dskd_ray.onnx.export; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
