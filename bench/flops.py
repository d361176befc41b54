"""How far is the model from this machine's limit? FLOPs per image and achieved FLOP/s.

Counts the full DSKD forward (teacher + students + anomaly map) per 256² image with
torch.utils.flop_counter for each backbone and student variant, measures forward-only
throughput at a few batch sizes (fp32, and channels_last / bf16 autocast where asked), and
compares the achieved FLOP/s with the machine's measured matmul peak.

    python bench/flops.py --backbones resnet18 efficientnet_lite0 --batch-sizes 1 8 16
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dskd_ray.config import DSKDConfig
from dskd_ray.model.network import DSKD


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """Measured dense matmul FLOP/s: the practical ceiling for convolution-heavy models."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def count_flops(model: DSKD, size: int) -> int:
    x = torch.rand(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model.predict(x)
    return counter.get_total_flops()


def throughput(
    model: DSKD,
    batch: int,
    size: int,
    device: torch.device,
    channels_last: bool,
    bf16: bool,
    seconds: float,
) -> float:
    x = torch.rand(batch, 3, size, size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with ctx:
        model.predict(x)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.predict(x)
            done += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "efficientnet_lite0"])
    parser.add_argument("--students", nargs="+", default=["both", "se", "sd"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument(
        "--modes", nargs="+", default=["fp32", "channels_last", "channels_last+bf16"]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    peak = matmul_peak(device)
    print(
        f"device {device}, {torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    print("| backbone | students | GFLOP/img | mode | batch | img/s | GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for backbone in args.backbones:
        for students in args.students:
            config = DSKDConfig(
                backbone=backbone, teacher_weights="random", students=students, image_size=args.size
            )
            model = DSKD(config).eval().to(device)
            flops = count_flops(model.cpu(), args.size)
            model.to(device)
            for mode in args.modes:
                for batch in args.batch_sizes:
                    ips = throughput(
                        model,
                        batch,
                        args.size,
                        device,
                        "channels_last" in mode,
                        "bf16" in mode,
                        args.seconds,
                    )
                    achieved = ips * flops
                    print(
                        f"| {backbone} | {students} | {flops / 1e9:.2f} | {mode} | {batch} | {ips:.1f} | "
                        f"{achieved / 1e9:.1f} | {100 * achieved / peak:.0f}% |",
                        flush=True,
                    )
                model = model.to(memory_format=torch.contiguous_format)


if __name__ == "__main__":
    main()
