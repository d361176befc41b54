"""Progress of long steps (training epochs, scoring, evaluation) as plain lines for logs.

Library code reports progress to the `dskd_ray.progress` logger, one record per epoch or every
few seconds, never per image. The CLI decides where those lines go (`cli._setup_logging`): to
stdout when stdout is not a terminal — `dskd train … > train.log` gets one line per epoch, as
Lightning and tqdm users expect, where a terminal progress bar would leave the log empty — and
to stderr with the other log lines under --verbose.
"""

from __future__ import annotations

import logging

PROGRESS = logging.getLogger("dskd_ray.progress")


def clock(seconds: float) -> str:
    """12:05 or 1:02:05: elapsed times and ETAs in progress lines."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta(done: float, total: float, elapsed: float) -> str:
    """Time left at the rate so far; "?" before anything is done."""
    if done <= 0:
        return "?"
    return clock(elapsed / done * max(total - done, 0))
