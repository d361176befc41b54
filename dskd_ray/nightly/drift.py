"""Drift: how far a night's image scores moved from the held-out normal scores of calibration.

The checkpoint keeps the held-out normal images' scores that its threshold came from
(docs/design.md §3). A camera or lighting change moves the score of nearly every image of a
night, and then every image crosses the threshold: the most common false-alarm storm on a line.
A night with a few real defects moves only its top scores. So the figure looks at the bulk:

    median shift = (median of the night's scores − median of the calibration scores)
                   / interquartile range of the calibration scores

"The typical image of tonight scores this many calibration IQRs above (or, negative, below) the
typical normal image." The median ignores up to half the night being anomalous; the IQR is the
calibration scores' own spread, so the figure means the same for every model. It is recorded in
each run's manifest; `dskd results` warns when |shift| ≥ `WARN_SHIFT` on a night of at least
`MIN_NIGHT_IMAGES` scored images. The level comes from `bench/drift.py` on the demo data
(docs/design.md §6, Drift). No Ray, no storage here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# See docs/design.md §6 (Drift) for the measurement behind both numbers.
WARN_SHIFT = 2.0
MIN_NIGHT_IMAGES = 10
# Fewer held-out scores than this give no usable median or IQR: no figure.
MIN_CALIBRATION_SCORES = 4


@dataclass
class ScoreDrift:
    """A night's score distribution against calibration; `median_shift` is the figure."""

    median_shift: float | None  # None when there is nothing to compare (see `why`)
    night_images: int  # scored images ("ok" rows) of the run
    calibration_images: int  # held-out normal scores in the checkpoint
    night_median: float | None = None
    calibration_median: float | None = None
    calibration_iqr: float | None = None
    above_threshold: float | None = None  # share of the night's images over the threshold
    why: str | None = None  # why there is no figure

    def to_dict(self) -> dict[str, Any]:
        return {"figure": "median_shift_in_calibration_iqr", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreDrift:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def flagged(self) -> bool:
        """The bulk of the night moved far from calibration, on enough images to say so."""
        return (
            self.median_shift is not None
            and self.night_images >= MIN_NIGHT_IMAGES
            and abs(self.median_shift) >= WARN_SHIFT
        )

    def shown(self, sign: bool = True) -> str:
        """The figure as printed, two decimals, never rounded across `WARN_SHIFT`: what is
        shown and what decides the warning agree (−1.98 is "−1.98", not "−2.0" without a
        warning; 1.999 is "+1.99", cut rather than rounded up to the warning's level)."""
        if self.median_shift is None:
            return "—"
        shift = round(self.median_shift, 2)
        if abs(shift) >= WARN_SHIFT > abs(self.median_shift):
            shift = math.trunc(self.median_shift * 100) / 100
        return f"{shift:+.2f}" if sign else f"{abs(shift):.2f}"

    def warning(self) -> str | None:
        """One line for a flagged night, else None."""
        if not self.flagged:
            return None
        assert self.median_shift is not None
        way = "above" if self.median_shift > 0 else "below"
        share = (
            f"; {self.above_threshold:.0%} of its images are over the threshold"
            if self.above_threshold is not None
            else ""
        )
        return (
            f"the night's median score ({self.night_median:.4g}) is "
            f"{self.shown(sign=False)} calibration IQRs {way} the held-out normal median "
            f"({self.calibration_median:.4g}){share}: a camera, lighting or product change "
            "moves every image; check the line before trusting these flags"
        )


def score_drift(
    night_scores: np.ndarray | Sequence[float],
    normal_scores: Sequence[float],
    threshold: float | None = None,
) -> ScoreDrift:
    """The drift figure of one run's scores against the checkpoint's held-out normal scores."""
    night = np.asarray(night_scores, np.float64)
    night = night[np.isfinite(night)]
    normal = np.asarray(normal_scores, np.float64)
    normal = normal[np.isfinite(normal)]
    drift = ScoreDrift(None, int(night.size), int(normal.size))
    if normal.size < MIN_CALIBRATION_SCORES:
        drift.why = (
            f"the checkpoint keeps {normal.size} held-out normal score(s); "
            f"{MIN_CALIBRATION_SCORES} are needed"
        )
        return drift
    q25, median, q75 = np.percentile(normal, [25, 50, 75])
    drift.calibration_median, drift.calibration_iqr = float(median), float(q75 - q25)
    if not night.size:
        drift.why = "the run scored no images"
        return drift
    drift.night_median = float(np.median(night))
    if threshold is not None:
        drift.above_threshold = float(np.mean(night > threshold))
    if not drift.calibration_iqr > 0:
        drift.why = "the held-out normal scores are all equal: no spread to measure in"
        return drift
    shift = (drift.night_median - drift.calibration_median) / drift.calibration_iqr
    drift.median_shift = float(shift) if math.isfinite(shift) else None
    return drift


def run_drift(run_id: str, night_scores: np.ndarray, threshold: Any | None) -> ScoreDrift:
    """`score_drift` of a scoring run against its checkpoint's `Threshold` (None: no threshold),
    logged as a warning when flagged, so the night's own log says so too."""
    normal = threshold.normal_scores if threshold is not None else []
    drift = score_drift(night_scores, normal, threshold.value if threshold is not None else None)
    if threshold is None:
        drift.why = "the checkpoint has no threshold, so no held-out normal scores"
    message = drift.warning()
    if message:
        log.warning("run %s: %s", run_id, message)
    return drift
