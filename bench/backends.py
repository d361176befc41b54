"""Scoring backends on this machine: PyTorch eager, PyTorch compiled, ONNX Runtime.

Images/s of `score_batch` (network, map, score) on decoded 256² batches, per backbone, for the
three ways `dskd score` can run the model: `--backend torch` (channels_last, the default),
`--backend torch --compile`, `--backend onnxruntime` (the graph `dskd export` writes, checked
against PyTorch first). Untrained students: speed does not depend on training. The backends
take turns for `--rounds` rounds and each keeps its best round, so a busy machine hurts them
alike.

    python bench/backends.py                       # efficientnet_lite0 and resnet18
    python bench/backends.py --backbones efficientnet_lite0 --seconds 5

Last line, machine-readable, for the first backbone:
    onnxruntime_vs_eager=<ratio> compile_vs_eager=<ratio>
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dskd_ray.checkpoint import make_checkpoint, save_checkpoint
from dskd_ray.config import DSKDConfig
from dskd_ray.export import export_graph
from dskd_ray.model import DSKD
from dskd_ray.onnx_scoring import OnnxScorer
from dskd_ray.scoring import BatchScorer, Scorer


def images_per_s(scorer: BatchScorer, images: np.ndarray, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        scorer.score_batch(images)
        done += len(images)
    return done / (time.perf_counter() - start)


def measure(backbone: str, args: argparse.Namespace, folder: Path) -> dict[str, object]:
    weights = "imagenet" if backbone == "efficientnet_lite0" else "random"
    config = DSKDConfig(backbone=backbone, teacher_weights=weights, image_size=args.image_size)
    torch.manual_seed(0)
    path = folder / f"{backbone}.pt"
    save_checkpoint(make_checkpoint(DSKD(config).eval()), path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3), np.uint8)

    start = time.perf_counter()
    exported = export_graph(str(path), images)
    export_s = time.perf_counter() - start
    scorers: dict[str, BatchScorer] = {
        "torch eager": Scorer(str(path), device="cpu", batch_size=args.batch_size),
        "torch compile": Scorer(str(path), device="cpu", batch_size=args.batch_size, compile=True),
        "onnxruntime": OnnxScorer(exported.graph, batch_size=args.batch_size),
    }
    warmup_s = {}
    for name, scorer in scorers.items():
        t = time.perf_counter()
        scorer.score_batch(images)  # compiles, or plans the ORT session's first run
        warmup_s[name] = round(time.perf_counter() - t, 1)
    best = dict.fromkeys(scorers, 0.0)
    for _ in range(args.rounds):
        for name, scorer in scorers.items():
            best[name] = max(best[name], images_per_s(scorer, images, args.seconds))
    row = {
        "backbone": backbone,
        "images_per_s": {k: round(v, 2) for k, v in best.items()},
        "first_batch_s": warmup_s,
        "export_s": round(export_s, 1),
        "export_check": exported.check.format(),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet18"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0, help="per backend per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/out/backends.json")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(b, args, Path(tmp)) for b in args.backbones]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    speeds = rows[0]["images_per_s"]
    assert isinstance(speeds, dict)
    eager = speeds["torch eager"]
    print(
        f"onnxruntime_vs_eager={speeds['onnxruntime'] / eager:.2f} "
        f"compile_vs_eager={speeds['torch compile'] / eager:.2f}"
    )


if __name__ == "__main__":
    main()
