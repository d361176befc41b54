"""What listing costs the driver of `dskd score`: peak memory per object and objects per second.

Each measurement is `dskd score INPUT --dry-run` in its own process, as a user runs it (list,
diff against what this model already scored, count; nothing scored): its peak RSS (its own
VmHWM, reported as it leaves) and the listing-and-diff seconds it prints. Inputs are zero-byte
image files, since a listing never reads one:

  local   N files in a tree of 100 folders, for each N in --local (10⁴ and 10⁵ by default);
  s3      --s3 objects on a loopback S3 server (moto's, in its own process);

each first with nothing scored, then with half of the images scored by committed runs (the
index the runs write, folded over --nights runs): the skip must add no per-night cost.

    python bench/listing.py                          # 10⁴ and 10⁵ local, 10⁴ on S3
    python bench/listing.py --local 10000 100000 1000000

Driver bytes per object come from the slope between the two largest local N (the interpreter
and pyarrow cancel out). The last line is machine-readable:
    driver_bytes_per_object=<slope, dry run, half scored> listing_objects_per_s=<largest local N>
    dry_run_peak_rss_mb=<the largest peak of any dry run measured>
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from dskd_ray.config import DSKDConfig
from dskd_ray.model.checkpoint import make_checkpoint, save_checkpoint
from dskd_ray.model.network import DSKD
from dskd_ray.nightly.listing import list_inputs
from dskd_ray.nightly.results import RESULT_SCHEMA, PartWriter, commit_run
from dskd_ray.nightly.run_index import ModelIndex

LINE = re.compile(r"listed (\d+) .* skipped (\d+) .*\(listing and diff ([\d.]+) s\)")


def make_tree(root: Path, n: int) -> None:
    for i in range(n):
        folder = root / f"line{i % 10}" / f"cam{(i // 10) % 10}"
        if i < 100:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:08d}.png").touch()


def upload_zero_byte(env: dict[str, str], bucket: str, n: int) -> str:
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    client = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"],
    )  # fmt: skip
    client.create_bucket(Bucket=bucket)
    client.create_bucket(Bucket="bench-out")
    keys = [f"plant/line{i % 10}/cam{(i // 10) % 10}/img_{i:08d}.png" for i in range(n)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b""), keys))
    return f"s3://{bucket}/plant"


def score_half(images: str, out: str, model_id: str, nights: int) -> None:
    """Commit `nights` runs that together scored half of the listed images, each with the index
    a real run writes (rows as `score_images` leaves them; no model needed)."""
    listing = list_inputs(images, out).table
    half = listing.slice(0, listing.num_rows // 2)
    per_night = -(-half.num_rows // nights)
    for night in range(nights):
        part = half.slice(night * per_night, per_night)
        run_id = f"2026010{night + 1}T000000Z-{night:06x}"
        n = part.num_rows
        columns = {c: pa.nulls(n, RESULT_SCHEMA.field(c).type) for c in RESULT_SCHEMA.names}
        columns |= {
            "image_uri": part["image_uri"], "image_version": part["image_version"],
            "image_bytes": part["image_bytes"], "status": pa.array(["ok"] * n),
            "retryable": pa.array([False] * n), "model_id": pa.array([model_id] * n),
            "run_id": pa.array([run_id] * n),
        }  # fmt: skip
        index = ModelIndex.load(out, model_id)  # as a run reads it before it starts
        writer = PartWriter(out, run_id)
        writer.write(pa.table(columns, schema=RESULT_SCHEMA))
        files = writer.close()
        commit_run(out, run_id, files, model_id=model_id)
        index.write(run_id, files)
    index = ModelIndex.load(out, model_id)
    assert len(index) == len(index.done_keys()) == half.num_rows


# `dskd` as a user runs it, reporting its own peak RSS as it leaves. VmHWM, not wait4's
# ru_maxrss: Linux carries the parent's RSS at the fork into the child's ru_maxrss across the
# exec, so this bench's own ~1.2 GB (torch, to make the model) was every dry run's "peak".
PEAK_LAUNCHER = """
import os, sys
leave = os._exit
def report_and_leave(code):
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    os.write(2, ("dskd-bench-peak " + hwm).encode())
    leave(code)
os._exit = report_and_leave  # cli.main leaves through os._exit, after every exit hook
sys.argv = ["dskd", *sys.argv[1:]]
from dskd_ray.cli import main
main()
"""
PEAK = re.compile(r"dskd-bench-peak VmHWM:\s+(\d+) kB")


def dry_run(images: str, model: str, out: str, env: dict[str, str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PEAK_LAUNCHER, "score", images, "--model", model, "--out", out,
         "--dry-run"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"dry run failed:\n{done.stderr[-3000:]}")
    match, peak = LINE.search(done.stdout), PEAK.search(done.stderr)
    if not match or not peak:
        raise RuntimeError(f"unexpected output: {done.stdout}\n{done.stderr[-2000:]}")
    listed, skipped, seconds = int(match[1]), int(match[2]), float(match[3])
    return {
        "listed": listed,
        "skipped": skipped,
        "listing_s": seconds,
        "objects_per_s": listed / seconds if seconds else 0.0,
        "peak_rss_mb": int(peak[1]) / 1024,
        "wall_s": time.perf_counter() - start,
    }


def measure(kind: str, n: int, images: str, model: str, model_id: str, work: Path,
            env: dict[str, str], nights: int) -> list[dict]:  # fmt: skip
    out = str(work / f"out-{kind}-{n}") if kind == "local" else f"s3://bench-out/{kind}-{n}"
    rows = []
    fresh = dry_run(images, model, out, env)
    assert fresh["listed"] == n and fresh["skipped"] == 0, fresh
    rows.append({"input": kind, "n": n, "scored_before": 0, **fresh})
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        score_half(images, out, model_id, nights)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    half = dry_run(images, model, out, env)
    assert half["listed"] == n and half["skipped"] == n // 2, half
    rows.append({"input": kind, "n": n, "scored_before": n // 2, **half})
    for row in rows[-2:]:
        print(
            f"{row['input']:5s} n={row['n']:>8d} scored_before={row['scored_before']:>7d} "
            f"peak_rss_mb={row['peak_rss_mb']:7.1f} listing_s={row['listing_s']:7.2f} "
            f"objects_per_s={row['objects_per_s']:9.0f}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--local", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--s3", type=int, default=10_000, help="objects on S3 (0: none)")
    parser.add_argument("--nights", type=int, default=5, help="runs the scored half spans")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="dskd-listing-"))
    try:
        model_path = work / "model.pt"
        ckpt = make_checkpoint(
            DSKD(DSKDConfig(backbone="resnet18", teacher_weights="random", image_size=64))
        )
        save_checkpoint(ckpt, model_path)
        model, model_id = str(model_path), ckpt.model_id
        env = dict(os.environ)
        rows: list[dict] = []
        for n in sorted(args.local):
            tree = work / f"tree-{n}"
            make_tree(tree, n)
            rows += measure("local", n, str(tree), model, model_id, work, env, args.nights)
            shutil.rmtree(tree)
        if args.s3:
            sys.path.insert(0, str(Path(__file__).parent))
            from scoring import moto_server

            with moto_server() as s3_env:
                env = {**os.environ, **s3_env}
                images = upload_zero_byte(s3_env, "bench-in", args.s3)
                rows += measure("s3", args.s3, images, model, model_id, work, env, args.nights)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    local = sorted((r for r in rows if r["input"] == "local"), key=lambda r: r["n"])
    (a_fresh, a_half), (b_fresh, b_half) = (local[-4], local[-3]), (local[-2], local[-1])
    slope = lambda a, b: (b["peak_rss_mb"] - a["peak_rss_mb"]) * 2**20 / (b["n"] - a["n"])  # noqa: E731
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.machine()}",
        "date": datetime.now(UTC).date().isoformat(),
        "rows": rows,
        "driver_bytes_per_object_fresh": slope(a_fresh, b_fresh),
        "driver_bytes_per_object_half_scored": slope(a_half, b_half),
        "listing_objects_per_s": b_fresh["objects_per_s"],
        # The whole dry run's peak (imports, the checkpoint's header, listing, index), largest N.
        "dry_run_peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"driver_bytes_per_object={result['driver_bytes_per_object_half_scored']:.0f} "
        f"listing_objects_per_s={result['listing_objects_per_s']:.0f} "
        f"dry_run_peak_rss_mb={result['dry_run_peak_rss_mb']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
