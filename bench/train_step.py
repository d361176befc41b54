"""Cost of one training step on this machine: plain, channels_last, torch.compile, both.

    python bench/train_step.py [--backbone efficientnet_lite0] [--students both se sd]
                               [--image-size 256] [--batch-size 16] [--steps 6]

Teacher features come from the cache as in `train` (the teacher is frozen, no augmentation), so
a step is the students' forward and backward plus Adam. Each setup gets a warm-up (compile time
reported apart), then `--steps` timed steps; images/s is the median step. Random images: the
weights' values do not change the cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dskd_ray.config import DSKDConfig
from dskd_ray.model.network import DSKD
from dskd_ray.training.loop import Students, make_optimizer, train_step


def measure(config: DSKDConfig, channels_last: bool, compile: bool, steps: int) -> dict:
    torch.manual_seed(0)
    model = DSKD(config)
    images = torch.rand(config.batch_size, 3, config.image_size, config.image_size)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    x = model.normalize(images).contiguous(memory_format=memory)
    teacher = model.teacher_features(x)
    optimizer = make_optimizer(model, config)
    forward = Students(model)
    if compile:
        forward = torch.compile(forward)
    model.train()
    start = time.perf_counter()
    train_step(model, optimizer, x, teacher, config.grad_clip, forward)
    warmup = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, x, teacher, config.grad_clip, forward)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {
        "students": config.students,
        "channels_last": channels_last,
        "compile": compile,
        "first_step_s": round(warmup, 2),
        "images_per_s": round(config.batch_size / step, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--teacher-weights", default="imagenet")
    parser.add_argument("--students", nargs="+", default=["both", "se", "sd"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    rows = []
    for students in args.students:
        config = DSKDConfig(
            backbone=args.backbone, teacher_weights=args.teacher_weights, students=students,
            df_input="teacher" if students == "sd" else "se", image_size=args.image_size,
            batch_size=args.batch_size,
        )  # fmt: skip
        for channels_last in (False, True):
            for compile in (False, True) if not args.no_compile else (False,):
                rows.append(measure(config, channels_last, compile, args.steps))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| students | channels_last | compile | first step s | images/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['students']} | {r['channels_last']} | {r['compile']} | {r['first_step_s']} "
            f"| {r['images_per_s']} |"
        )


if __name__ == "__main__":
    main()
