"""Shared fixtures: small generated images and tiny configs, so tests run on 2 cores."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dskd_ray.config import DSKDConfig

torch.set_num_threads(2)


def write_textures(
    folder: Path, n: int, size: int = 64, seed: int = 0, fmt: str = "png"
) -> list[Path]:
    """n smooth random textures (normal images)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi, 3)
        img = np.stack(
            [0.5 + 0.3 * np.sin(2 * np.pi * 4 * (xx + yy) + p) for p in phase], axis=-1
        ) + rng.normal(0, 0.03, (size, size, 3))
        path = folder / f"{i:03d}.{fmt}"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


# --- encoded test images, good and bad (bulk scoring, results) -------------------------------


def texture(rng: np.random.Generator, fmt: str = "PNG") -> bytes:
    """A small smooth random texture, 64–96 px a side, encoded as `fmt`."""
    w, h = (int(v) for v in rng.integers(64, 97, 2))
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    phase = rng.uniform(0, 2 * np.pi, 3)
    img = np.stack([0.5 + 0.3 * np.sin(8 * np.pi * (xx + yy) + p) for p in phase], -1)
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims a huge size: a decompression bomb (as in test_images)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def broken_files(rng: np.random.Generator) -> dict[str, tuple[bytes, str]]:
    """name → (bytes, words the error row must contain), one per way a file can be bad."""
    jpeg, png = texture(rng, "JPEG"), texture(rng, "PNG")
    return {
        "broken/corrupt.png": (rng.bytes(700), "not a recognised image format"),
        "broken/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "broken/truncated.png": (png[: len(png) // 2], "truncated"),
        "broken/empty.jpg": (b"", "empty file"),
        "broken/bomb.png": (png_claiming(60_000, 60_000), "decompression bomb"),
        "broken/unsupported.tif": (
            b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
            "not a recognised",
        ),
    }


def good_files(rng: np.random.Generator, n: int, prefix: str = "") -> dict[str, bytes]:
    files = {}
    for i in range(n):
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp")][i % 3]
        files[f"{prefix}line{i % 4}/cam{i % 3}/img_{i:04d}.{ext}"] = texture(rng, fmt)
    # Names a careless key builder would let climb out of maps/ or collide.
    files[f"{prefix}odd/../../escape.png"] = texture(rng)
    files[f"{prefix}odd/sp ace ü #1.png"] = texture(rng)
    files[f"{prefix}odd//double-slash.png"] = texture(rng)
    return files


@pytest.fixture(scope="session", autouse=True)
def _own_graph_cache(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN202 - a generator
    """`--backend auto` runs ONNX Runtime for a model whose graph is cached: the tests keep
    their own cache, so what ~/.cache holds never changes what a test runs."""
    import os

    saved = os.environ.get("DSKD_RAY_CACHE")
    os.environ["DSKD_RAY_CACHE"] = str(tmp_path_factory.mktemp("dskd-ray-cache"))
    yield
    if saved is None:
        os.environ.pop("DSKD_RAY_CACHE", None)
    else:
        os.environ["DSKD_RAY_CACHE"] = saved


@pytest.fixture
def tiny_config() -> DSKDConfig:
    # The students alone: most tests build untrained models, whose memory bank would be empty
    # (a finished checkpoint with one is refused); the memory has tests of its own.
    return DSKDConfig(
        memory="none",
        backbone="resnet18",
        teacher_weights="random",
        image_size=64,
        epochs=2,
        batch_size=4,
        holdout_fraction=0.25,
    )


def memory_config(**changes: object) -> DSKDConfig:
    """The memory's tests' model: tiny, random teacher, a 150-patch bank."""
    base = DSKDConfig(
        backbone="resnet18", teacher_weights="random", image_size=64, epochs=1, batch_size=4,
        holdout_fraction=0.2, memory="knn", memory_size=150,
    )  # fmt: skip
    return base.replace(**changes)


@pytest.fixture(scope="module")
def textures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten normal textures shared by a module's tests, which only read them."""
    folder = tmp_path_factory.mktemp("textures") / "normal"
    write_textures(folder, 10)
    return folder


@pytest.fixture
def normal_folder(tmp_path: Path) -> Path:
    write_textures(tmp_path / "normal", 8)
    return tmp_path / "normal"


@pytest.fixture(autouse=True)
def _quiet_random_teacher_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dskd_ray")


# --- Ctrl-C as a terminal sends it -----------------------------------------------------------


def interrupted(args: list[str], ready: Callable[[str], bool], tmp_path: Path,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run `dskd ARGS` as a terminal runs it (a process group of its own) and press Ctrl-C:
    SIGINT to the whole group once `ready(stderr so far)` says so.

    The child starts with SIGINT deliverable and at its default, as from a terminal: a child
    inherits its parent's ignored signals and blocked mask, and in a full suite the pytest
    process does not always have SIGINT as a terminal gives it (two fresh-clone suites saw
    the three Ctrl-C runs carry on to the end and exit 0, while each passed alone)."""
    log = tmp_path / "stderr.txt"

    def as_from_a_terminal() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with open(log, "w") as err:
        job = subprocess.Popen(
            [sys.executable, "-m", "dskd_ray.cli", *args], stdout=subprocess.PIPE, stderr=err,
            text=True, start_new_session=True, env=env, preexec_fn=as_from_a_terminal,
        )  # fmt: skip
        try:
            deadline = time.time() + 600
            while not ready(log.read_text()):
                assert job.poll() is None, f"it ended before Ctrl-C:\n{log.read_text()}"
                assert time.time() < deadline, log.read_text()
                time.sleep(0.05)
            os.killpg(job.pid, signal.SIGINT)
            stdout, _ = job.communicate(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, log.read_text())


_RAY_FORWARDED = re.compile(
    r"^(\x1b\[[0-9;]*m)*\(((raylet|gcs_server|autoscaler|monitor)\b[^)]*|.*?\bpid=\d+[^)]*)\)"
)


def own_lines(stderr: str) -> list[str]:
    """The lines of `stderr` that dskd printed itself: a driver connected to a cluster also
    receives its processes' log lines (`(raylet) ... over 95% full`, `(ScoringActor pid=1) ...`),
    and they arrive whenever Ray's log monitor sends them, even after dskd's last line (a CI run
    saw a raylet disk warning land after `dskd: interrupted`)."""
    return [line for line in stderr.strip().splitlines() if not _RAY_FORWARDED.match(line)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(**env: str) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free loopback port, in its own process: (process, endpoint URL).
    `env`: moto's own settings for it (INITIAL_NO_AUTH_ACTION_COUNT, …)."""
    import shutil
    import urllib.request

    port = _free_port()
    # The moto installed beside this interpreter, not whichever one PATH finds first.
    sibling = Path(sys.executable).parent / "moto_server"
    exe = str(sibling) if sibling.exists() else shutil.which("moto_server") or "moto_server"
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)


def stop_moto(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def s3_server():  # noqa: ANN201 - yields a dict of connection settings
    """A real S3-protocol server (moto's) on loopback, in its own process, for the session.

    Yields {"endpoint_url", "key", "secret", "region"}; the standard AWS variables point at it
    so s3fs, pyarrow and Ray (driver and workers) all reach it the way a user's would.
    """
    proc, endpoint = start_moto()
    settings = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        # Without this a wrong endpoint lets pyarrow fall back to real AWS (docs/design.md §7).
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield {
            "endpoint_url": endpoint,
            "key": "testing",
            "secret": "testing-secret",
            "region": "us-east-1",
        }
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_moto(proc)


def make_bucket(s3_server: dict, name: str) -> None:
    """moto refuses s3fs.mkdir(bucket) (docs/design.md §7): buckets come from boto3."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id=s3_server["key"],
        aws_secret_access_key=s3_server["secret"],
        region_name=s3_server["region"],
    )
    client.create_bucket(Bucket=name)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: dict):  # noqa: ANN201 - yields the ray module, initialised
    """One real local Ray for the whole session (init twice without shutdown raises).

    Starts after the S3 server so workers inherit its AWS_* settings (docs/design.md §7).
    """
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
