"""Moved to `dskd_ray.onnx.runtime` (issue 23). This old path stays for one release, then goes."""

import warnings

from dskd_ray.onnx.graph import session_for
from dskd_ray.onnx.runtime import OnnxScorer

__all__ = ["OnnxScorer", "session_for"]

warnings.warn(
    "dskd_ray.onnx_scoring moved to dskd_ray.onnx.runtime; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
