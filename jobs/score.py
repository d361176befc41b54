"""Nightly bulk scoring as a Ray job; the same options as `dskd score`.

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/score.py s3://bucket/images/ --model s3://bucket/models/m.pt --out s3://bucket/scores/

A plant's night, every line by its own model in one run (images/<line>/… by models/<line>.pt):

        python jobs/score.py s3://plant/images/ --models s3://plant/models/ --out s3://plant/scores/

Inside a job, Ray connects to the job's own cluster (RAY_ADDRESS is set for it); the scoring
actors and tasks run wherever the cluster has room.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import dskd_ray  # noqa: F401 - installed, or shipped with --working-dir
except ImportError:  # run from a checkout that is not installed: the repo root is one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dskd_ray.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "score", *sys.argv[1:]]
    main()
