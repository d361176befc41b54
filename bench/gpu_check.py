"""The device check behind bench/gpu.sh: forward fp32 / bf16 / compiled, the scoring pipeline,
a few training steps; a short table last. Runs on CUDA when there is one, else on the CPU with
smaller batches (so the script itself is checked on machines without a GPU).

    python bench/gpu_check.py [--batch-sizes 64 256] [--seconds 5] [--pipeline-images 400]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dskd_ray.config import DSKDConfig
from dskd_ray.inference.scoring import Scorer
from dskd_ray.model.checkpoint import make_checkpoint
from dskd_ray.model.inputs import images_to_tensor
from dskd_ray.model.network import DSKD
from dskd_ray.training.loop import make_optimizer, train_step

SIZE = 256


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward(checkpoint, device: torch.device, batch: int, seconds: float) -> list[dict]:
    """Images/s of Scorer.score_batch (model + map) per setting, and the scores' drift from fp32."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    settings = {"fp32": {}, "bf16": {"precision": "bf16"}, "fp32 compiled": {"compile": True}}
    rows, reference = [], None
    for name, kwargs in settings.items():
        row = {"what": f"forward {name}", "batch": batch}
        try:
            start = time.perf_counter()
            scorer = Scorer(checkpoint, device=str(device), batch_size=batch, **kwargs)
            scores = scorer.score_batch(images).scores  # warm-up (and compilation)
            sync(device)
            row["warmup_s"] = time.perf_counter() - start
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds or done == 0:
                scorer.score_batch(images)
                done += batch
            sync(device)
            row["images_per_s"] = done / (time.perf_counter() - start)
            if reference is None:
                reference = scores
            row["max_score_diff"] = float(np.abs(scores - reference).max())
        except Exception as e:  # noqa: BLE001 - report it in the table, carry on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        rows.append(row)
        print(row, flush=True)
    return rows


def training(device: torch.device, batch: int, steps: int) -> dict:
    """Images/s of full training steps (teacher forward + both students + backward)."""
    config = DSKDConfig(backbone="efficientnet_lite0", image_size=SIZE, batch_size=batch)
    model = DSKD(config).to(device).train()
    amp = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    rng = np.random.default_rng(1)
    x = images_to_tensor(rng.integers(0, 255, (batch, SIZE, SIZE, 3), dtype=np.uint8), device)
    x = model.normalize(x).contiguous(memory_format=torch.channels_last)
    train_step(model, optimizer, x, None, config.grad_clip, autocast_dtype=amp)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = train_step(model, optimizer, x, None, config.grad_clip, autocast_dtype=amp)
    sync(device)
    seconds = time.perf_counter() - start
    row = {
        "what": f"train step ({'bf16' if amp else 'fp32'})",
        "batch": batch,
        "images_per_s": steps * batch / seconds,
        "loss": float(loss),
    }
    print(row, flush=True)
    return row


def pipeline(images: int, batch: int, timeout: float) -> dict:
    """bench/scoring.py on local 1024² JPEGs: the plain loop and `dskd score`, steady states."""
    cmd = [sys.executable, str(Path(__file__).with_name("scoring.py")), "--images", str(images),
           "--sizes", "1024", "--formats", "jpg", "--no-s3", "--batch-size", str(batch),
           "--forward-seconds", "3", "--out", "bench/out/gpu_scoring"]  # fmt: skip
    row: dict = {"what": "scoring 1024² JPEG", "batch": batch}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row["error"] = f"timed out after {timeout:.0f} s"
        return row
    table = [ln for ln in out.stdout.splitlines() if ln.startswith("| 1024")]
    if out.returncode or not table:
        row["error"] = (out.stderr or out.stdout).strip().splitlines()[-1][:100]
        return row
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    row["loop_images_per_s"], row["images_per_s"] = float(cells[1]), float(cells[2])
    ratio = re.search(r"pipeline_vs_loop=([\d.]+)", out.stdout)
    row["pipeline_vs_loop"] = float(ratio.group(1)) if ratio else float("nan")
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[64, 256] if cuda else [8, 32]
    )
    parser.add_argument("--seconds", type=float, default=5.0 if cuda else 3.0)
    parser.add_argument("--train-steps", type=int, default=20 if cuda else 3)
    parser.add_argument("--pipeline-images", type=int, default=400 if cuda else 64)
    parser.add_argument("--pipeline-timeout", type=float, default=240.0)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)

    checkpoint = make_checkpoint(
        DSKD(DSKDConfig(backbone="efficientnet_lite0", image_size=SIZE)).eval()
    )
    rows = []
    for batch in args.batch_sizes:
        rows += forward(checkpoint, device, batch, args.seconds)
    rows.append(training(device, args.batch_sizes[0], args.train_steps))
    rows.append(pipeline(args.pipeline_images, args.batch_sizes[0], args.pipeline_timeout))

    print(f"\nLite0 DSKD (both students) at {SIZE}² on {name}")
    print(f"| {'what':24} | {'batch':>5} | {'images/s':>9} | notes |")
    print(f"|{'-' * 26}|{'-' * 7}|{'-' * 11}|-------|")
    for row in rows:
        ips = f"{row['images_per_s']:9.1f}" if "images_per_s" in row else f"{'—':>9}"
        notes = []
        if "error" in row:
            notes.append(row["error"])
        if "max_score_diff" in row:
            notes.append(f"max |Δscore| vs fp32 {row['max_score_diff']:.1e}")
        if "warmup_s" in row:
            notes.append(f"warm-up {row['warmup_s']:.1f} s")
        if "pipeline_vs_loop" in row:
            notes.append(
                f"plain loop {row['loop_images_per_s']:.1f}/s, dskd score / loop {row['pipeline_vs_loop']:.2f}"
            )
        print(f"| {row['what']:24} | {row['batch']:>5} | {ips} | {'; '.join(notes)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
