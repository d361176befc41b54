"""Bulk-scoring throughput against its limits, in one run:

  (a) forward only   the model and map on pre-decoded batches (the compute ceiling), plain fp32
                     and the fast path (channels_last; bf16 with --bf16);
  (b) plain loop     one process: read, decode, resize, model, map, encode, write maps + Parquet;
  (c) dskd score     the Ray Data pipeline (`dskd score` as a user runs it) on local folders;
  (d) dskd score     the same on a loopback S3 server (moto's, in its own process).

on the same generated JPEG and PNG images at 1024×1024 (like inspection photos) and 256×256.
The model is an untrained EfficientNet-Lite0 DSKD with the real ImageNet teacher at 256²: speed
does not depend on training. `dskd score` runs with its default backend ("auto"), as a nightly
run of a known model does: the model's ONNX graph is exported once before the sets (timed; a
cache of the bench's own) and (b) runs the backend the default chose, so (c)/(b) compares like
with like. `--backend torch` runs everything on PyTorch (the default before "auto"). Start-up (imports, Ray, actors, model load) is reported apart from
the steady state; the ratios compare steady states. Peak memory: the `dskd score` process
(driver) and one scoring actor, read from /proc (VmHWM) while they run.

    python bench/scoring.py                      # 300 images per set, all four sets
    python bench/scoring.py --images 60 --sizes 256 --formats jpg   # a quick look

Start-up: `dskd score` end to end on 10 local 256² JPEGs in a new process, as a user runs it
(imports, listing, model load, scoring, commit): by default such a handful is scored in the
process; the same with `--in-process-max 0` (a new local Ray and an actor) for comparison; and,
with "auto", the model's first run (no graph cached: ten images do not pay for an export, so
torch scores them).

    python bench/scoring.py --startup-only        # just that, ~1 minute

The last line is machine-readable, for the headline set (the first size and format):
    pipeline_vs_loop=<(c)/(b)> s3_vs_loop=<(d)/(b)> startup_s=<10 images, default path>
    backend=<what (c) ran> images_per_s=<(c), steady>
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from dskd_ray.config import DSKDConfig
from dskd_ray.inference.scoring import BatchScorer, Scorer
from dskd_ray.io.images import decode_image
from dskd_ray.io.map_png import encode_map_png, map_uri, quantize_map
from dskd_ray.io.storage import read_object, write_object
from dskd_ray.model.anomaly_map import anomaly_map, image_score
from dskd_ray.model.checkpoint import make_checkpoint, save_checkpoint
from dskd_ray.model.inputs import images_to_tensor
from dskd_ray.model.network import DSKD
from dskd_ray.onnx.runtime import OnnxScorer

MODEL_SIZE = 256


# --- inputs ------------------------------------------------------------------------------------


def make_images(folder: Path, n: int, side: int, fmt: str, seed: int = 0) -> list[Path]:
    """n textured photos-alike (periodic structure, noise, a vignette), `side`² pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    vignette = 1 - 0.3 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    paths = []
    for i in range(n):
        f = rng.uniform(6, 14)
        phase = rng.uniform(0, 2 * np.pi, 3)
        img = np.stack([0.5 + 0.25 * np.sin(f * np.pi * (xx + 0.3 * yy) + p) for p in phase], -1)
        img = img * vignette[..., None] + rng.normal(0, 0.04, img.shape).astype(np.float32)
        pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
        buffer = io.BytesIO()
        if fmt == "jpg":
            pil.save(buffer, format="JPEG", quality=90)
        else:
            pil.save(buffer, format="PNG", compress_level=6)
        path = folder / f"img_{i:05d}.{fmt}"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


# --- memory ------------------------------------------------------------------------------------


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Polls VmHWM (a process's peak resident memory) of the driver and of scoring actors."""

    def __init__(self, driver_pid: int) -> None:
        self.driver_pid = driver_pid
        self.driver_mb = 0.0
        self.actor_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.driver_mb = max(self.driver_mb, _vm_hwm_mb(self.driver_pid) or 0.0)
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"ScoringActor" in cmdline:  # Ray titles actor processes by their class
                    self.actor_mb = max(self.actor_mb, _vm_hwm_mb(int(entry.name)) or 0.0)
            self._stop.wait(0.25)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- (a) forward only --------------------------------------------------------------------------


def forward_only(
    model: Path,
    images: np.ndarray,
    batch_size: int,
    seconds: float,
    bf16: bool,
    graph: bytes | None,
) -> dict[str, float]:
    """Images/s of score_batch (model + map) on decoded arrays, per fast-path setting."""
    settings = {"fp32 plain": {"channels_last": False}, "fp32 channels_last": {}}
    if bf16:
        settings["bf16 channels_last"] = {"precision": "bf16"}
    out = {}
    scorers: dict[str, BatchScorer] = {
        name: Scorer(str(model), device="cpu", batch_size=batch_size, **kwargs)
        for name, kwargs in settings.items()
    }
    if graph is not None:
        scorers["onnxruntime"] = OnnxScorer(graph, batch_size=batch_size)
    for name, scorer in scorers.items():
        scorer.score_batch(images[:batch_size])  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            i = done % (len(images) - batch_size + 1)
            scorer.score_batch(images[i : i + batch_size])
            done += batch_size
        out[name] = done / (time.perf_counter() - start)
    return out


# --- (b) the plain loop ------------------------------------------------------------------------


@dataclass
class Timers:
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("read", "decode", "model", "map", "encode", "write"), 0.0
        )
    )

    @contextmanager
    def __call__(self, name: str):  # noqa: ANN204 - a context manager
        start = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - start


def plain_loop(
    model: Path, paths: list[Path], out: Path, batch_size: int, graph: bytes | None = None
) -> dict:
    """Everything `dskd score` does to an image, in one process, batch after batch; on ONNX
    Runtime when `graph` is given (model and map are then one step, timed as "model")."""
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    scorer = Scorer(str(model), device="cpu", batch_size=batch_size)
    net, cfg = scorer.model, scorer.model.config
    onnx = OnnxScorer(graph, batch_size=batch_size) if graph is not None else None
    load_s = time.perf_counter() - t0
    maps_root = str(out / "maps")
    rows: dict[str, list] = {"image_uri": [], "score": [], "map_uri": [], "map_scale": []}
    timers = Timers()
    first_batch_s = 0.0
    t1 = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        chunk = [str(p) for p in paths[start : start + batch_size]]
        with timers("read"):
            blobs = [read_object(u) for u in chunk]
        with timers("decode"):
            images = np.stack([decode_image(b, MODEL_SIZE)[0] for b in blobs])
        if onnx is not None:
            with timers("model"):
                result = onnx.score_batch(images)
                maps, scores = result.maps, result.scores
        else:
            with timers("model"), torch.inference_mode():
                x = images_to_tensor(images, scorer.device).contiguous(
                    memory_format=torch.channels_last
                )
                teacher, features = net.pyramids(net.normalize(x))
            with timers("map"), torch.inference_mode():
                # The memory's search is part of the map here, as the students' comparison is.
                memory = net.memory.distances(teacher, cfg.strides) if net.memory else None
                maps = anomaly_map(
                    features, (MODEL_SIZE, MODEL_SIZE), cfg.level_fusion, cfg.blur_sigma,
                    *net.level_statistics(), net.baseline(), cfg.map_baseline, memory,
                    net.memory.scale() if net.memory else 1.0, cfg.distance, cfg.memory_weight,
                )  # fmt: skip
                scores = image_score(maps, cfg.score_top_k).numpy()
                maps = maps.numpy()
        with timers("encode"):
            pngs = [encode_map_png(*quantize_map(m)) for m in maps]
        with timers("write"):
            for uri, png, m, s in zip(chunk, pngs, maps, scores, strict=True):
                key = map_uri(maps_root, uri, "v1", scorer.model_id)
                write_object(key, png)
                rows["image_uri"].append(uri)
                rows["score"].append(float(s))
                rows["map_uri"].append(key)
                rows["map_scale"].append(quantize_map(m)[1])
        if start == 0:
            first_batch_s = time.perf_counter() - t1
    with timers("write"):
        pq.write_table(pa.table(rows), out / "results.parquet")
    total = time.perf_counter() - t1
    n, first = len(paths), min(batch_size, len(paths))
    return {
        "startup_s": load_s + first_batch_s,
        "steady_images_per_s": (n - first) / (total - first_batch_s),
        "total_s": load_s + total,
        "shares": {k: v / sum(timers.seconds.values()) for k, v in timers.seconds.items()},
    }


# --- (c), (d) dskd score -----------------------------------------------------------------------


def dskd_score(
    model: str, images: str, out: str, batch_size: int, env: dict[str, str], extra: list[str]
) -> dict:
    """`dskd score` in its own process, as a user runs it; its run manifest gives the timings."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "dskd_ray.cli", "score", images, "--model", model,
           "--out", out, "--rescore", "--batch-size", str(batch_size), *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with PeakMemory(proc.pid) as memory:
        output, _ = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"dskd score failed:\n{output.decode()[-3000:]}")
    summary = _manifest_summary(out, env)
    rows = summary["scored"] + summary["errors"]
    steady = summary["steady_images_per_s"]
    steady_s = (rows - summary["startup_rows"]) / steady if steady else 0.0
    return {
        "startup_s": wall - steady_s,
        "steady_images_per_s": steady,
        "total_s": wall,
        "backend": summary.get("backend", ""),
        "errors": summary["errors"],
        "driver_peak_mb": memory.driver_mb,
        "actor_peak_mb": memory.actor_mb,
    }


def _manifest_summary(out: str, env: dict[str, str]) -> dict:
    from dskd_ray.nightly.results import committed_runs

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        runs = committed_runs(out)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return runs[-1].manifest["summary"]


@contextmanager
def moto_server():
    """A loopback S3 server in its own process; yields the environment that points at it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(exe) if exe.exists() else "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def upload(env: dict[str, str], bucket: str, files: list[Path], prefix: str) -> str:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"],
    )  # fmt: skip
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)
    for f in files:
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    return f"s3://{bucket}/{prefix}"


# --- start-up ------------------------------------------------------------------------------------


def startup(
    model: Path, work: Path, env: dict[str, str], extra: list[str], repeats: int = 2
) -> dict:
    """Seconds for `dskd score` on 10 images, end to end, best of `repeats`: the default path,
    on a new local Ray (`--in-process-max 0`), and the model's first run (no graph cached)."""
    paths = make_images(work / "startup-in", 10, 256, "jpg", seed=1)
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    uncached = {**env, "DSKD_RAY_CACHE": str(work / "empty-cache")}
    result = {}
    for name, flags, environment in [
        ("startup_s", [], env),
        ("startup_ray_s", ["--in-process-max", "0"], env),
        ("startup_first_run_s", [], uncached),
    ]:
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "dskd_ray.cli", "score", str(paths[0].parent), "--model",
                 str(model), "--out", str(work / f"startup-out-{name}-{i}"), *flags, *extra],
                env=environment, check=True, capture_output=True, text=True,
            )  # fmt: skip
            times.append(time.perf_counter() - start)
        ran = "onnxruntime" if "with onnxruntime" in done.stdout else "torch"
        result[name] = min(times)
        print(f"{name}: {', '.join(f'{t:.1f}' for t in times)} s ({ran})", flush=True)
    return result


# --- the run -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=300, help="images per set")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--formats", nargs="+", default=["jpg", "png"], choices=["jpg", "png"])
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call")
    parser.add_argument("--forward-seconds", type=float, default=8.0)
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast in (a)")
    parser.add_argument("--no-s3", action="store_true", help="skip (d)")
    parser.add_argument("--out", default="bench/out/scoring", help="where results.json goes")
    parser.add_argument("--startup-only", action="store_true", help="only the 10-image start-up")
    parser.add_argument("--startup-repeats", type=int, default=2, help="best of this many")
    parser.add_argument(
        "--backend", choices=["auto", "torch"], default="auto", help="dskd score's --backend"
    )
    parser.add_argument(
        "--memory-size",
        type=int,
        default=0,
        help="the model has the teacher's memory with a bank of this many patches (0: none)",
    )
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="dskd-bench-scoring-"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = work / "model.pt"
    config = DSKDConfig(
        backbone="efficientnet_lite0", teacher_weights="imagenet", image_size=MODEL_SIZE,
        memory="knn" if args.memory_size else "none",
    )  # fmt: skip
    net = DSKD(config).eval()
    if net.memory is not None:  # its cost does not depend on what it holds
        net.memory.bank = torch.randn(args.memory_size, net.memory.channels)
    checkpoint = make_checkpoint(net, training={"complete": True})
    save_checkpoint(checkpoint, model)
    memory = f" + memory of {args.memory_size} patches" if args.memory_size else ""
    print(
        f"{args.images} images per set; model Lite0 DSKD{memory} at {MODEL_SIZE}², batch "
        f"{args.batch_size}; "
        f"--backend {args.backend}; {os.cpu_count()} CPUs; load average "
        f"{os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    results: dict = {"args": vars(args), "sets": {}}
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "DSKD_RAY_CACHE": str(work / "cache")}
    # Ray starts its workers at nice 15: on a machine shared with other work they would yield to
    # it where the loop (b) does not, and the ratios would measure that, not the pipeline.
    env["RAY_worker_niceness"] = "0"
    extra = ["--backend", args.backend]
    graph = None
    if args.backend == "auto":  # a known model: its graph exported on an earlier night
        from dskd_ray.onnx.export import cached_graph

        os.environ["DSKD_RAY_CACHE"] = env["DSKD_RAY_CACHE"]
        start = time.perf_counter()
        graph = cached_graph(checkpoint)
        results["export_s"] = time.perf_counter() - start
        print(f"graph exported and checked in {results['export_s']:.1f} s", flush=True)
    results["startup"] = startup(model, work, env, extra, args.startup_repeats)
    if args.startup_only:
        shutil.rmtree(work, ignore_errors=True)
        (out_dir / "startup.json").write_text(json.dumps(results["startup"], indent=2) + "\n")
        print(" ".join(f"{k}={v:.1f}" for k, v in results["startup"].items()))
        return 0
    s3 = moto_server() if not args.no_s3 else None
    s3_env = s3.__enter__() if s3 else None
    try:
        decoded = None
        for size in args.sizes:
            for fmt in args.formats:
                name = f"{size}² {fmt.upper()}"
                paths = make_images(work / f"in-{size}-{fmt}", args.images, size, fmt)
                row: dict = {"bytes_per_image": sum(p.stat().st_size for p in paths) / len(paths)}
                if decoded is None:  # (a) does not depend on the file format or size
                    decoded = np.stack(
                        [decode_image(p.read_bytes(), MODEL_SIZE)[0] for p in paths[:64]]
                    )
                    results["forward_only"] = forward_only(
                        model, decoded, args.batch_size, args.forward_seconds, args.bf16, graph
                    )
                    print(f"(a) forward only: {results['forward_only']}", flush=True)
                row["loop"] = plain_loop(
                    model, paths, work / f"loop-{size}-{fmt}", args.batch_size, graph
                )
                print(f"{name} (b) loop: {row['loop']}", flush=True)
                row["local"] = dskd_score(
                    str(model), str(paths[0].parent), str(work / f"out-{size}-{fmt}"),
                    args.batch_size, env, extra,
                )  # fmt: skip
                print(f"{name} (c) dskd score local: {row['local']}", flush=True)
                if s3_env:
                    uri = upload(s3_env, "bench", paths, f"in-{size}-{fmt}")
                    s3_model = upload(s3_env, "bench", [model], "models") + "/model.pt"
                    row["s3"] = dskd_score(
                        s3_model, uri, f"s3://bench/out-{size}-{fmt}", args.batch_size,
                        {**env, **s3_env}, extra,
                    )  # fmt: skip
                    print(f"{name} (d) dskd score S3: {row['s3']}", flush=True)
                results["sets"][name] = row
                shutil.rmtree(work / f"in-{size}-{fmt}", ignore_errors=True)
    finally:
        if s3:
            s3.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_end"] = os.getloadavg()[0]
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    fwd = results["forward_only"]
    print("\n(a) forward only (model + map on decoded 256² batches), images/s:")
    for k, v in fwd.items():
        print(f"    {k:20} {v:7.1f}")
    print(
        "\n| set | (b) loop | (c) dskd score local | (d) dskd score S3 | (c)/(b) | (d)/(b) "
        "| start-up s (b / c / d) | driver / actor peak MB (c) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, row in results["sets"].items():
        b, c, d = row["loop"], row["local"], row.get("s3")
        ips = [x["steady_images_per_s"] if x else float("nan") for x in (b, c, d)]
        starts = " / ".join(f"{x['startup_s']:.1f}" if x else "—" for x in (b, c, d))
        print(
            f"| {name} | {ips[0]:.1f} | {ips[1]:.1f} | {ips[2]:.1f} | {ips[1] / ips[0]:.2f} | "
            f"{ips[2] / ips[0]:.2f} | {starts} | {c['driver_peak_mb']:.0f} / {c['actor_peak_mb']:.0f} |"
        )
    print("\nShare of the plain loop's time (b):")
    for name, row in results["sets"].items():
        shares = row["loop"]["shares"]
        parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items())
        print(f"    {name}: {parts}")
    print(f"load average at end {results['load_average_end']:.1f}")
    head = next(iter(results["sets"].values()))
    b = head["loop"]["steady_images_per_s"]
    c = head["local"]["steady_images_per_s"]
    d = head["s3"]["steady_images_per_s"] if "s3" in head else float("nan")
    start = results["startup"]["startup_s"]
    print(
        f"pipeline_vs_loop={c / b:.2f} s3_vs_loop={d / b:.2f} startup_s={start:.1f} "
        f"backend={head['local']['backend']} images_per_s={c:.1f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
