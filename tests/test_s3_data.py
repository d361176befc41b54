"""Training data, teacher weights and checkpoints on object storage (a real moto server)."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import s3fs
import torch

from conftest import make_bucket, start_moto, stop_moto, write_textures
from dskd_ray.config import DSKDConfig
from dskd_ray.io.data import discover_categories, training_images
from dskd_ray.model.checkpoint import load_checkpoint
from dskd_ray.model.network import DSKD
from dskd_ray.training.loop import train


def test_train_from_s3_and_write_checkpoint_to_s3(
    s3_server: dict, tmp_path: Path, tiny_config: DSKDConfig
) -> None:
    make_bucket(s3_server, "factory")
    fs = s3fs.S3FileSystem()
    local = tmp_path / "tile"
    write_textures(local / "train" / "good", 6)
    write_textures(local / "test" / "good", 2, seed=3)
    (local / "train" / "good" / "broken.png").write_bytes(b"not a png")
    fs.put(str(local), "factory/lines/tile", recursive=True)

    name, uris = training_images("s3://factory/lines/tile")
    assert name == "tile" and all(u.startswith("s3://factory/lines/tile/train/good/") for u in uris)
    [category] = discover_categories("s3://factory/lines")
    assert category.name == "tile" and len(category.test) == 2

    source = DSKD(tiny_config)
    torch.save(source.teacher.state_dict(), tmp_path / "teacher.pth")
    fs.put(str(tmp_path / "teacher.pth"), "factory/weights/teacher.pth")
    config = tiny_config.replace(teacher_weights="s3://factory/weights/teacher.pth", epochs=1)

    result = train(config, "s3://factory/lines/tile", "s3://factory/models/tile.pt")
    assert [Path(s).name for s, _ in result.skipped] == ["broken.png"]
    ckpt = load_checkpoint("s3://factory/models/tile.pt")
    assert ckpt.threshold is not None and ckpt.model_id == result.checkpoint.model_id
    teacher = ckpt.build_model().teacher.state_dict()
    for key, value in source.teacher.state_dict().items():
        assert torch.equal(teacher[key], value)


def test_training_from_s3_retries_a_read_that_fails_once(
    s3_server: dict, tmp_path: Path, tiny_config: DSKDConfig, monkeypatch
) -> None:
    """A connection reset on the first GET of one image (injected in the S3 client's read, on
    the moto server's bucket) is retried, not taken for an unreadable image."""
    make_bucket(s3_server, "flaky")
    fs = s3fs.S3FileSystem()
    for p in write_textures(tmp_path / "normal", 4):
        fs.put_file(str(p), f"flaky/normal/{p.name}")
    read = s3fs.S3FileSystem._cat_file
    failed: list[str] = []

    async def fails_once(self: s3fs.S3FileSystem, path: str, *args: object, **kw: object):  # noqa: ANN202
        if path.endswith("normal/001.png") and not failed:
            failed.append(path)
            raise ConnectionResetError(104, "Connection reset by peer (injected)")
        return await read(self, path, *args, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", fails_once)
    # fsspec caches filesystem instances, and an instance binds its sync methods when it is
    # made: one made by an earlier test would never call the patched read.
    s3fs.S3FileSystem.clear_instance_cache()
    result = train(tiny_config.replace(epochs=1), "s3://flaky/normal", str(tmp_path / "m.pt"))
    assert failed == ["flaky/normal/001.png"]
    assert result.skipped == [] and result.n_train + result.n_holdout == 4


# --- an output that cannot be written (issue 24) -----------------------------------------------


@pytest.fixture(scope="module")
def put_denied():  # noqa: ANN201 - yields an environment
    """A moto server of its own that checks credentials (moto's IAM): a bucket `locked`, and a
    key pair whose policy allows every S3 action except s3:PutObject in it. Yields the
    environment of a process that uses that key pair."""
    import boto3

    proc, endpoint = start_moto()
    try:
        root = {"endpoint_url": endpoint, "aws_access_key_id": "testing",
                "aws_secret_access_key": "testing-secret", "region_name": "us-east-1"}  # fmt: skip
        boto3.client("s3", **root).create_bucket(Bucket="locked")
        iam = boto3.client("iam", **root)
        iam.create_user(UserName="scorer")
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::locked/*"},
        ]}  # fmt: skip
        iam.put_user_policy(
            UserName="scorer", PolicyName="no-put", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="scorer")["AccessKey"]
        # From now on every request is authenticated and authorised (moto's /moto-api/).
        urllib.request.urlopen(urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"},
        ))  # fmt: skip
        yield {
            **os.environ,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    finally:
        stop_moto(proc)


def test_an_s3_output_that_cannot_be_written_fails_the_dry_run_in_one_line(
    s3_server: dict, put_denied: dict, tmp_path: Path, tiny_config: DSKDConfig
) -> None:
    """A bucket that does not exist, a key pair denied s3:PutObject: the dry run (and the run,
    which probes first too) says so in one line naming the output, instead of "fine"."""
    from dskd_ray.model.checkpoint import make_checkpoint, save_checkpoint

    save_checkpoint(make_checkpoint(DSKD(tiny_config)), tmp_path / "m.pt")
    write_textures(tmp_path / "images", 2)
    cases = [
        (dict(os.environ), "s3://no-such-bucket/scores/",
         "The specified bucket does not exist"),
        (put_denied, "s3://locked/scores/",
         "Access Denied (AccessDenied: An error occurred (AccessDenied) when calling the "
         "PutObject operation: Access Denied)"),
    ]  # fmt: skip
    for env, out, cause in cases:
        result = subprocess.run(
            [sys.executable, "-m", "dskd_ray.cli", "score", str(tmp_path / "images"),
             "--model", str(tmp_path / "m.pt"), "--out", out, "--dry-run"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert result.stderr.startswith(f"dskd: error: cannot write to the output {out}: {cause}")
    assert put_denied["AWS_SECRET_ACCESS_KEY"] not in result.stderr
