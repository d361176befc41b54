"""Bulk-scoring throughput: the Ray Data pipeline against a plain single-process loop.

Both score the same generated images with the same checkpoint (an untrained EfficientNet-Lite0
DSKD with the real ImageNet teacher: throughput does not depend on training). The plain loop
reads, decodes and runs the model in one process; the pipeline is `score_images` on a local Ray
(list → read+decode tasks → scoring actor → map-writing tasks → Parquet), so it also writes
every map and row. Each is timed as start-up (model load; Ray's actor start) apart from the
steady state.

    python bench/scoring_pipeline.py --images 200 --size 256 --repeats 2

The machine's load is printed with the numbers: other work on a 2-core machine moves them.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dskd_ray.checkpoint import make_checkpoint, save_checkpoint
from dskd_ray.config import DSKDConfig
from dskd_ray.images import decode_image
from dskd_ray.model import DSKD
from dskd_ray.scoring import Scorer
from dskd_ray.storage import read_object


def make_images(folder: Path, n: int, side: int, seed: int = 0) -> list[Path]:
    """n JPEG textures a little larger than the model input, so decoding includes a resize."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi, 3)
        img = np.stack([0.5 + 0.3 * np.sin(8 * np.pi * (xx + yy) + p) for p in phase], -1)
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
        path = folder / f"img_{i:04d}.jpg"
        buffer = io.BytesIO()
        Image.fromarray((img * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=92)
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def plain_loop(model: Path, paths: list[Path], batch_size: int) -> dict[str, float]:
    """One process: read, decode, score, batch after batch (torch on every core)."""
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    scorer = Scorer(str(model), device="cpu", batch_size=batch_size)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = np.stack([decode_image(read_object(str(p)), scorer.image_size)[0] for p in chunk])
        scorer.score_batch(images)
    steady = time.perf_counter() - t1
    return {
        "startup_s": startup,
        "steady_images_per_s": len(paths) / steady,
        "images_per_s": len(paths) / (startup + steady),
        "total_s": startup + steady,
    }


def pipeline(model: Path, images: Path, out: Path, batch_size: int) -> dict[str, float]:
    from dskd_ray.batch_scoring import ScoringOptions, score_images

    summary = score_images(
        str(images), str(model), str(out), ScoringOptions(batch_size=batch_size, rescore=True)
    )
    assert summary.errors == 0, summary
    return {
        "startup_s": summary.startup_seconds,
        "steady_images_per_s": summary.steady_images_per_s,
        "images_per_s": summary.images_per_s,
        "total_s": summary.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256, help="model input size")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dskd-bench-scoring"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    shutil.rmtree(args.workdir, ignore_errors=True)
    paths = make_images(args.workdir / "images", args.images, side=args.size + args.size // 4)
    config = DSKDConfig(backbone=args.backbone, teacher_weights="imagenet", image_size=args.size)
    model = args.workdir / "model.pt"
    save_checkpoint(make_checkpoint(DSKD(config)), model)
    print(f"{args.images} images, {args.size}² input, {args.backbone}, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.1f}")  # fmt: skip

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    ray_init_s = time.perf_counter() - t0
    rows = []
    for r in range(args.repeats):
        rows.append(("plain loop", r, plain_loop(model, paths, args.batch_size)))
        out = args.workdir / f"out{r}"
        rows.append(
            ("ray pipeline", r, pipeline(model, args.workdir / "images", out, args.batch_size))
        )
    ray.shutdown()

    print(f"ray.init: {ray_init_s:.1f} s (paid once per process, not in the pipeline's start-up)")
    print(
        f"{'':14}{'rep':>4}{'start-up s':>12}{'steady img/s':>14}{'overall img/s':>15}{'total s':>9}"
    )
    for name, r, m in rows:
        print(f"{name:14}{r:>4}{m['startup_s']:>12.1f}{m['steady_images_per_s']:>14.1f}"
              f"{m['images_per_s']:>15.1f}{m['total_s']:>9.1f}")  # fmt: skip
    best = {
        name: max(m["steady_images_per_s"] for n, _, m in rows if n == name)
        for name in ("plain loop", "ray pipeline")
    }
    overall = {
        name: max(m["images_per_s"] for n, _, m in rows if n == name)
        for name in ("plain loop", "ray pipeline")
    }
    print(f"steady-state ratio pipeline / plain: {best['ray pipeline'] / best['plain loop']:.2f}; "
          f"overall (start-up included): {overall['ray pipeline'] / overall['plain loop']:.2f}")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
