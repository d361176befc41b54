"""Scoring backends on this machine: PyTorch eager, PyTorch compiled, ONNX Runtime.

Images/s of `score_batch` (network, map, score) on decoded 256² batches, per backbone, for the
three ways `dskd score` can run the model: `--backend torch` (channels_last, the default),
`--backend torch --compile`, `--backend onnxruntime` (the graph `dskd export` writes, checked
against PyTorch first). Untrained students: speed does not depend on training. The backends
take turns for `--rounds` rounds and each keeps its best round, so a busy machine hurts them
alike.

    python bench/backends.py                       # efficientnet_lite0 and resnet18
    python bench/backends.py --backbones efficientnet_lite0 --seconds 5

Start-up, what `dskd score --backend auto` weighs (ONNX Runtime on CPUs when installed; torch
without `--compile`): the export (once per model, then cached), the ONNX Runtime session, and
`--compile`'s first batches (a full one, then a smaller last one, which compiles again) in a new
process, as a new scoring actor pays them, with torch's compile cache empty (a new node) and
warm (the next actor on it). From those and the speeds: how many images an actor must score
before each pays for its start.

With `--memory-sizes`, the cost of the teacher's memory instead (docs/design.md §2): for the
first backbone, the students alone (size 0) and with a memory bank of each size, and the memory
alone (`--memory-students none`), two backends (eager PyTorch and ONNX
Runtime; compiled PyTorch is opt-in and left out) taking turns, and each model's peak memory
scoring in a process of its own (VmHWM). The bank's contents do not change its cost: random.

    python bench/backends.py --memory-sizes 0 512 1024 2048 4096 --memory-students both none

Last line, machine-readable, for the first backbone:
    onnxruntime_vs_eager=<ratio> compile_vs_eager=<ratio> compile_pays_after=<images per actor, cold cache>
    export_pays_after=<images, first run of a model>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dskd_ray.config import DSKDConfig
from dskd_ray.inference.scoring import BatchScorer, Scorer
from dskd_ray.model.checkpoint import make_checkpoint, save_checkpoint
from dskd_ray.model.network import DSKD
from dskd_ray.onnx.export import export_graph
from dskd_ray.onnx.runtime import OnnxScorer


def images_per_s(scorer: BatchScorer, images: np.ndarray, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        scorer.score_batch(images)
        done += len(images)
    return done / (time.perf_counter() - start)


_FIRST_BATCHES = """
import sys, time
import numpy as np, torch
from dskd_ray.inference.scoring import Scorer
path, batch, compile = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
torch.set_num_threads(torch.get_num_threads())
t = time.perf_counter()
scorer = Scorer(path, device="cpu", batch_size=batch, compile=compile)
load = time.perf_counter() - t
size = scorer.image_size
rng = np.random.default_rng(0)
times = []
for n in (batch, max(1, batch // 2 + 1)):  # a full batch, then a run's smaller last one
    images = rng.integers(0, 256, (n, size, size, 3), np.uint8)
    t = time.perf_counter()
    scorer.score_batch(images)
    times.append(time.perf_counter() - t)
print(load, *times)
"""


def first_batches(path: Path, batch: int, compile: bool, cache: Path) -> dict[str, float]:
    """A new process's model load and first two batches (full, then smaller), in seconds."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_BATCHES, str(path), str(batch), "1" if compile else "0"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout.split()  # fmt: skip
    load, full, last = (float(x) for x in out[-3:])
    return {
        "load_s": round(load, 2),
        "first_batch_s": round(full, 2),
        "last_batch_s": round(last, 2),
    }


def pays_after(start_s: float, slow: float, fast: float) -> int | None:
    """Images after which a start of `start_s` more is won back by going `fast` not `slow`."""
    gain = 1 / slow - 1 / fast
    return round(start_s / gain) if gain > 0 else None


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
    start = time.perf_counter()
    session = OnnxScorer(exported.graph, batch_size=args.batch_size)
    session_s = time.perf_counter() - start
    scorers: dict[str, BatchScorer] = {
        "torch eager": Scorer(str(path), device="cpu", batch_size=args.batch_size),
        "torch compile": Scorer(str(path), device="cpu", batch_size=args.batch_size, compile=True),
        "onnxruntime": session,
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
    cache = folder / f"inductor-{backbone}"  # empty: a new node's first compiling actor
    new_process = {
        "torch eager": first_batches(path, args.batch_size, False, cache),
        "torch compile, cold cache": first_batches(path, args.batch_size, True, cache),
        "torch compile, warm cache": first_batches(path, args.batch_size, True, cache),
    }
    eager_start = sum(new_process["torch eager"].values())
    eager, compiled, ort = best["torch eager"], best["torch compile"], best["onnxruntime"]
    row = {
        "backbone": backbone,
        "images_per_s": {k: round(v, 2) for k, v in best.items()},
        "first_batch_s": warmup_s,
        "export_s": round(export_s, 1),
        "onnxruntime_session_s": round(session_s, 2),
        "export_check": exported.check.format(),
        "new_process_start": new_process,
        # Images an actor must score before the start it costs is won back:
        "pays_after_images": {
            "compile, cold cache": pays_after(
                sum(new_process["torch compile, cold cache"].values()) - eager_start,
                eager, compiled,
            ),
            "compile, warm cache": pays_after(
                sum(new_process["torch compile, warm cache"].values()) - eager_start,
                eager, compiled,
            ),
            "onnxruntime, first export": pays_after(export_s + session_s, eager, ort),
        },
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


_PEAK_MEMORY = """
import sys
import numpy as np, torch
from dskd_ray.onnx.runtime import OnnxScorer
from dskd_ray.inference.scoring import Scorer
path, batch, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
scorer = OnnxScorer(path, batch) if backend == "onnxruntime" else Scorer(path, "cpu", batch)
size = scorer.image_size
before = [ln for ln in open("/proc/self/status") if ln.startswith("VmRSS")][0].split()[1]
images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8)
for _ in range(3):
    scorer.score_batch(images)
peak = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()[1]
print(int(before) // 1024, int(peak) // 1024)
"""


def peak_memory_mb(path: Path, batch: int, backend: str) -> dict[str, int]:
    """A new process's resident memory with the model loaded, and its peak while scoring."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY, str(path), str(batch), backend],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return {"loaded_mb": int(out[-2]), "peak_mb": int(out[-1])}


def measure_memory(args: argparse.Namespace, folder: Path) -> list[dict[str, object]]:
    """Images/s and peak memory of the students alone and with each bank size, and of the memory
    alone, on eager PyTorch and ONNX Runtime, the backends taking turns (best round each)."""
    backbone = args.backbones[0]
    weights = "imagenet" if backbone == "efficientnet_lite0" else "random"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3), np.uint8)
    models: dict[tuple[str, int], dict[str, BatchScorer]] = {}
    files: dict[tuple[str, int], tuple[Path, Path]] = {}
    for students in args.memory_students:
        for size in args.memory_sizes:
            if students == "none" and size == 0:
                continue
            memory = "knn" if size else "none"
            config = DSKDConfig(
                backbone=backbone, teacher_weights=weights, image_size=args.image_size,
                students=students, memory=memory,
            )  # fmt: skip
            torch.manual_seed(0)
            model = DSKD(config).eval()
            if model.memory is not None:
                model.memory.bank = torch.randn(size, model.memory.channels)
            path = folder / f"{students}-{size}.pt"
            save_checkpoint(make_checkpoint(model, training={"complete": True}), path)
            graph = folder / f"{students}-{size}.onnx"
            graph.write_bytes(export_graph(str(path), images).graph)
            files[students, size] = path, graph
            models[students, size] = {
                "torch eager": Scorer(str(path), device="cpu", batch_size=args.batch_size),
                "onnxruntime": OnnxScorer(str(graph), batch_size=args.batch_size),
            }
            for scorer in models[students, size].values():
                scorer.score_batch(images)  # warm-up
    best = {key: dict.fromkeys(scorers, 0.0) for key, scorers in models.items()}
    for _ in range(args.rounds):
        for key, scorers in models.items():
            for name, scorer in scorers.items():
                best[key][name] = max(best[key][name], images_per_s(scorer, images, args.seconds))
    rows = []
    for (students, size), speeds in best.items():
        alone = best.get((students if students != "none" else "both", 0))
        path, graph = files[students, size]
        row = {
            "backbone": backbone, "students": students, "memory_size": size,
            "images_per_s": {k: round(v, 2) for k, v in speeds.items()},
            "ms_per_image": {k: round(1000 / v, 2) for k, v in speeds.items()},
            "vs_students_alone": (
                {k: round(alone[k] / v, 3) for k, v in speeds.items()} if alone else None
            ),
            "peak_memory": {
                "torch eager": peak_memory_mb(path, args.batch_size, "torch"),
                "onnxruntime": peak_memory_mb(graph, args.batch_size, "onnxruntime"),
            },
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


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
    parser.add_argument(
        "--memory-sizes", type=int, nargs="+", help="measure the memory's cost at these banks"
    )
    parser.add_argument(
        "--memory-students", nargs="+", default=["both", "none"], help="with --memory-sizes"
    )
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
        f"{os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    if args.memory_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure_memory(args, Path(tmp))
        print(f"load average at end {os.getloadavg()[0]:.1f}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
        for row in rows:
            print(
                f"students={row['students']} memory_size={row['memory_size']} "
                f"ms_per_image={row['ms_per_image']} vs_students_alone={row['vs_students_alone']}"
            )
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(b, args, Path(tmp)) for b in args.backbones]
    print(f"load average at end {os.getloadavg()[0]:.1f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    speeds = rows[0]["images_per_s"]
    assert isinstance(speeds, dict)
    eager = speeds["torch eager"]
    pays = rows[0]["pays_after_images"]
    assert isinstance(pays, dict)
    print(
        f"onnxruntime_vs_eager={speeds['onnxruntime'] / eager:.2f} "
        f"compile_vs_eager={speeds['torch compile'] / eager:.2f} "
        f"compile_pays_after={pays['compile, cold cache']} "
        f"export_pays_after={pays['onnxruntime, first export']}"
    )


if __name__ == "__main__":
    main()
