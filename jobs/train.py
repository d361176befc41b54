"""Ray Jobs entry point for distributed training.

    ray job submit --working-dir . -- python jobs/train.py DATA --out CKPT --workers N [...]

Takes exactly the options of `dskd train` (see `dskd train --help`); `--workers` is required,
since a job is meant to train on the cluster. The job's driver joins the cluster through the
RAY_ADDRESS that `ray job submit` sets. `--out` is written by the driver (on the head node): on a
real cluster give s3:// for DATA, --out and --storage-path.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    if not any(a == "--workers" or a.startswith("--workers=") for a in argv):
        print(
            "jobs/train.py: error: --workers N is required (see 'dskd train --help')",
            file=sys.stderr,
        )
        sys.exit(2)
    from dskd_ray.cli import main as dskd_main

    sys.argv = ["dskd", "train", *argv]
    dskd_main()


if __name__ == "__main__":
    main(sys.argv[1:])
