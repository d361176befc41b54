"""Training submitted through the real Ray Jobs API: `ray start --head` (dashboard on 127.0.0.1,
token authentication on) → `ray job submit … -- python jobs/train.py …` → SUCCEEDED → checkpoint.

The head runs as subprocesses with its own ports and temp dir, so it can live beside the session's
`ray_cluster` in this pytest process, and this test never calls `ray.init` itself. Teardown stops
exactly the head it started (`ray start --block` shuts its node down on SIGTERM, then any leftover
process of its temp dir is ended by pid): `ray stop` would end every Ray process on the machine,
the session's cluster and anyone else's included.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import _free_port, write_textures
from dskd_ray.model.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def ray_head() -> Iterator[dict[str, str]]:
    """A local head with the Jobs API and token auth; yields the client's address and env."""
    temp_dir = tempfile.mkdtemp(prefix="rayj", dir="/tmp")  # short: Unix socket paths are capped
    token_file = Path(temp_dir, "auth_token")
    token_file.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The job's `python` is the head's: start it from this project's environment.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM: stop now, no drain wait
    dashboard = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard,
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--ray-client-server-port": _free_port(),
    }
    log = open(Path(temp_dir, "head.log"), "w")  # noqa: SIM115 - closed in teardown
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         *[f"{k}={v}" for k, v in ports.items()]],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        # The token a user copies from the head (`ray get-auth-token`) and gives the client.
        token = _run([RAY, "get-auth-token"], env).stdout.strip()
        assert token == token_file.read_text()
        client = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        client.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        deadline = time.time() + 120
        while _run([RAY, "job", "list", "--address", address], client, 60).returncode != 0:
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    f"ray head did not start:\n{Path(temp_dir, 'head.log').read_text()}"
                )
            time.sleep(1)
        yield {
            "address": address,
            "temp_dir": temp_dir,
            **{"env:" + k: v for k, v in client.items()},
        }
    finally:
        _stop_head(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)  # `ray start --block` then stops the node it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
    # Anything of this head still alive (its temp dir is in every command line) ends by pid.
    leftovers = [pid for pid, cmdline in _processes() if temp_dir in cmdline]
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in leftovers):
            time.sleep(0.2)


def _processes() -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found.append(
                    (int(entry.name), (entry / "cmdline").read_bytes().decode(errors="replace"))
                )
    return found


def _client_env(head: dict[str, str]) -> dict[str, str]:
    return {k.removeprefix("env:"): v for k, v in head.items() if k.startswith("env:")}


def test_training_job_through_the_jobs_api(ray_head: dict[str, str], tmp_path: Path) -> None:
    env = _client_env(ray_head)
    address = ray_head["address"]
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-such-token")
    refused = _run([RAY, "job", "list", "--address", address], no_token, 60)
    assert refused.returncode != 0  # token auth is on: no token, no jobs

    write_textures(tmp_path / "normal", 8)
    out = tmp_path / "model.pt"
    job_id = f"dskd-train-{uuid.uuid4().hex[:8]}"
    submitted = _run(
        [RAY, "job", "submit", "--address", address, "--submission-id", job_id,
         "--working-dir", ".", "--no-wait", "--",
         "python", "jobs/train.py", str(tmp_path / "normal"), "--out", str(out),
         "--workers", "2", "--epochs", "1", "--batch-size", "4", "--image-size", "64",
         "--teacher-weights", "random", "--holdout-fraction", "0.25",
         "--storage-path", str(tmp_path / "runs"), "--run-name", "job-test"],
        env,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr

    status, deadline = "", time.time() + 240
    while time.time() < deadline:
        status = _run([RAY, "job", "status", "--address", address, job_id], env, 60).stdout.lower()
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    logs = _run([RAY, "job", "logs", "--address", address, job_id], env, 60).stdout
    assert "succeeded" in status, f"{status}\n--- job logs ---\n{logs[-4000:]}"
    assert "checkpoint:" in logs

    ckpt = load_checkpoint(out)
    assert ckpt.training["complete"] and ckpt.training["epoch"] == 1
    assert ckpt.meta["ray"]["workers"] == 2 and ckpt.meta["ray"]["run_name"] == "job-test"
    assert ckpt.threshold is not None
    assert (tmp_path / "runs" / "job-test" / "final" / "model.pt").exists()


def test_jobs_entry_point_requires_workers() -> None:
    done = subprocess.run(
        [sys.executable, "jobs/train.py", "data", "--out", "m.pt"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "--workers" in done.stderr
