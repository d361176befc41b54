"""Training throughput (images/s): the local loop vs Ray Train with 1 and 2 workers.

    python bench/train_throughput.py [--backbone resnet18] [--image-size 128] [--images 40]
                                     [--epochs 3] [--batch-size 8] [--cpus 2] [--repeats 2]

Setups on the same CPUs (`--cpus`, default 2): the local loop with 1 or `--cpus` torch threads,
one Ray worker with 1 or `--cpus` threads, two Ray workers with half the threads each. Reported per epoch from the
trainers' own epoch timings; "steady" is the mean of the epochs after the first (the first pays
for warm-up), "wall" is the whole call including Ray's worker start and image decoding. Images are
generated textures; the teacher is random by default (its weights do not change the cost).
Setups run interleaved, `--repeats` times each (the machine may be shared): best and median are
reported. Results go to stdout and bench/out/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dskd_ray.config import DSKDConfig
from dskd_ray.training.loop import train


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi, 3)
        img = np.stack([0.5 + 0.3 * np.sin(8 * np.pi * (xx + yy) + p) for p in phase], axis=-1)
        img += rng.normal(0, 0.03, img.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:04d}.png")


def summarize(name: str, per_epoch: list[float], wall: float, images: int) -> dict:
    steady = statistics.mean(per_epoch[1:]) if len(per_epoch) > 1 else per_epoch[0]
    return {
        "setup": name,
        "epoch_images_per_s": [round(x, 2) for x in per_epoch],
        "steady_images_per_s": round(steady, 2),
        "wall_s": round(wall, 1),
        "wall_images_per_s": round(images / wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--teacher-weights", default="random")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-local", action="store_true")
    args = parser.parse_args()

    import ray

    from dskd_ray.training.distributed import RayOptions, train_distributed

    config = DSKDConfig(
        backbone=args.backbone,
        teacher_weights=args.teacher_weights,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        holdout_fraction=0.1,
    )
    results: dict[str, list[dict]] = {}

    def record(name: str, per_epoch: list[float], wall: float, images: int) -> None:
        results.setdefault(name, []).append(summarize(name, per_epoch, wall, images))
        print(json.dumps(results[name][-1]), flush=True)

    # (kind, workers, torch threads per process); Ray asks one CPU per thread.
    half = max(1, args.cpus // 2)
    setups = [("local", 1, 1), ("local", 1, args.cpus), ("ray", 1, 1), ("ray", 1, args.cpus)]
    setups.append(("ray", 2, half))
    if args.skip_local:
        setups = [s for s in setups if s[0] != "local"]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dskd-bench-") as tmp:
        data = Path(tmp, "images")
        write_images(data, args.images, args.image_size)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        # Interleaved repeats: on a shared machine, load drifts; each setup gets several turns.
        for repeat in range(args.repeats):
            for kind, workers, threads in setups:
                name = (
                    f"local loop, {threads} thread{'s' * (threads > 1)}"
                    if kind == "local"
                    else f"Ray Train, {workers} worker{'s' * (workers > 1)} × {threads} thread"
                    + "s" * (threads > 1)
                )
                start = time.perf_counter()
                if kind == "local":
                    torch.set_num_threads(threads)
                    result = train(config, str(data), str(Path(tmp, "local.pt")), device="cpu")
                else:
                    options = RayOptions(
                        workers=workers,
                        cpus_per_worker=threads,
                        storage_path=str(Path(tmp, "runs")),
                        run_name=f"bench-{workers}x{threads}-{repeat}",
                        keep_checkpoints=1,
                    )
                    out = str(Path(tmp, "ray.pt"))
                    result = train_distributed(config, str(data), out, options)
                wall = time.perf_counter() - start
                per_epoch = [h.images_per_s for h in result.history]
                record(name, per_epoch, wall, result.n_train * args.epochs)
        ray.shutdown()

    table = []
    for name, runs in results.items():
        steady = [r["steady_images_per_s"] for r in runs]
        table.append(
            {
                "setup": name,
                "best_steady_images_per_s": max(steady),
                "median_steady_images_per_s": round(statistics.median(steady), 2),
                "median_wall_s": round(statistics.median(r["wall_s"] for r in runs), 1),
            }
        )
    report = {
        "settings": {**vars(args), "torch": torch.__version__, "cpu_count": os.cpu_count()},
        "load_average_before_after": [load_before, os.getloadavg()],
        "summary": table,
        "runs": results,
    }
    out = Path(__file__).parent / "out" / "train_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| setup | best steady img/s | median steady img/s | median wall s |")
    print("|---|---|---|---|")
    for row in table:
        print(
            f"| {row['setup']} | {row['best_steady_images_per_s']} "
            f"| {row['median_steady_images_per_s']} | {row['median_wall_s']} |"
        )
    print(f"load average before / after: {load_before} / {os.getloadavg()}")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
