"""Listing and URI rules of `dskd_ray.io.storage`, on real local folders (no Ray)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import write_textures
from dskd_ray.errors import ConfigError
from dskd_ray.io.storage import printable_name
from dskd_ray.io.storage_listing import NOT_UTF8, ListingStats, check_output, iter_images


def test_a_name_that_is_not_utf8_is_listed_escaped_with_an_error(tmp_path: Path) -> None:
    write_textures(tmp_path / "in", 2)
    raw = os.fsencode(tmp_path / "in") + b"/\xff\xfe.png"
    with open(raw, "wb") as f:
        f.write(b"whatever")
    listed = [e for e in iter_images(str(tmp_path / "in")) if e is not None]
    assert len(listed) == 3
    [bad] = [e for e in listed if e.error]
    assert bad.uri == f"{tmp_path}/in/\\xff\\xfe.png" and bad.error == NOT_UTF8
    bad.uri.encode("utf-8")  # valid UTF-8: Parquet, JSON and a terminal take it
    assert all(e.error is None for e in listed if e is not bad)


def test_printable_name_round_trips_valid_names() -> None:
    assert printable_name("s3://b/sp ace ü #1.png") == "s3://b/sp ace ü #1.png"
    assert printable_name(os.fsdecode(b"/x/\xe9.png")) == "/x/\\xe9.png"


def test_symlinks_are_counted_and_only_files_inside_are_listed(tmp_path: Path) -> None:
    images = tmp_path / "in"
    write_textures(images / "a", 2)
    (tmp_path / "out.png").write_bytes(b"x")
    os.symlink(images / "a" / "000.png", images / "inside.png")
    os.symlink(tmp_path / "out.png", images / "outside.png")
    os.symlink(images / "gone.png", images / "broken.png")
    os.symlink(images / "a", images / "loop")  # a folder link: its files are listed via a/
    os.symlink(images, images / "a" / "up")  # a loop, were folder links followed
    stats = ListingStats()
    uris = sorted(e.uri for e in iter_images(str(images), stats=stats) if e is not None)
    assert uris == [f"{images}/a/000.png", f"{images}/a/001.png", f"{images}/inside.png"]
    assert (stats.symlinks, stats.symlinks_skipped) == (5, 4)


def test_output_inside_input_is_left_out_whatever_its_spelling(tmp_path: Path) -> None:
    images = tmp_path / "in"
    write_textures(images, 1)
    write_textures(images / "scores" / "maps", 2)  # what an earlier run wrote
    os.symlink(images, tmp_path / "alias")
    for out in (images / "scores", tmp_path / "alias" / "scores", images / "x" / ".." / "scores"):
        uris = [e.uri for e in iter_images(str(images), exclude=str(out)) if e is not None]
        assert uris == [f"{images}/000.png"], out
    # A symlink into the output is not a way around it.
    os.symlink(images / "scores" / "maps" / "000.png", images / "peek.png")
    uris = [e.uri for e in iter_images(str(images), exclude=str(images / "scores")) if e]
    assert uris == [f"{images}/000.png"]


def test_output_equal_to_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    os.symlink(tmp_path / "in", tmp_path / "alias")
    for out in ("in", "in/", "alias", "in/sub/..", "./in"):
        with pytest.raises(ConfigError, match="is INPUT itself"):
            check_output(str(tmp_path / "in"), str(tmp_path / out))
    check_output(str(tmp_path / "in"), str(tmp_path / "in" / "scores"))  # inside: allowed
    for out in ("s3://b/images", "s3://b/images/", "s3://b//images//"):
        with pytest.raises(ConfigError, match="is INPUT itself"):
            check_output("s3://b/images/", out)
    check_output("s3://b/images", "s3://b/images-scores")


def test_s3_listing_pages_and_shards_find_every_key_once(s3_server: dict) -> None:
    """More than one ListObjectsV2 page per shard, several shards, and the keys a folder walk
    misses (an empty segment, files beside folders); the same set as one flat listing."""
    import s3fs

    from conftest import make_bucket

    make_bucket(s3_server, "st-listing")
    keys = [f"plant/big/img_{i:04d}.png" for i in range(1100)]  # two pages in one shard
    keys += [f"plant/line{i % 5}/cam{i % 3}/img_{i}.jpg" for i in range(200)]
    keys += ["plant/top.png", "plant//empty-segment.png", "plant/a/b/c/d/e/deep.png"]
    fs = s3fs.S3FileSystem()
    fs.pipe({f"st-listing/{k}": b"" for k in keys} | {"st-listing/plant/notes.txt": b"x"})
    fs.pipe({"st-listing/plant/marker/": b""})  # a "folder" marker some tools write
    fs.pipe({"st-listing/plantation/not-under-the-prefix.png": b""})

    stats = ListingStats()
    listed = list(iter_images("s3://st-listing/plant", stats=stats))
    images = sorted(e.uri for e in listed if e is not None)
    assert images == sorted(f"s3://st-listing/{k}" for k in keys)  # each once, nothing else
    assert sum(e is None for e in listed) == 1  # notes.txt
    assert all(e.version and e.size == 0 for e in listed if e is not None)
    # The prefix really was split: many chains of pages, listed in parallel.
    assert stats.chains > 20 and stats.pages > stats.chains / 2
    # The output inside the input is left out, as for local folders.
    rest = [e for e in iter_images("s3://st-listing/plant", exclude="s3://st-listing/plant/big")]
    assert sum(e is not None for e in rest) == len(keys) - 1100


# --- the output's write probe (issue 24) -------------------------------------------------------


def test_the_write_probe_leaves_nothing_and_names_an_output_it_cannot_write(
    tmp_path: Path,
) -> None:
    from dskd_ray.errors import StorageError
    from dskd_ray.io.storage import check_writable

    check_writable(str(tmp_path / "new" / "deeper" / "out"))  # folders made for the probe…
    assert list(tmp_path.iterdir()) == []  # …are removed with it
    (tmp_path / "out").mkdir()
    check_writable(str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(StorageError) as e:
        check_writable(str(tmp_path / "a-file" / "out"))
    assert str(e.value) == (
        f"cannot write to the output {tmp_path}/a-file/out: Not a directory: {tmp_path}/a-file/out"
    )
    # A folder no process may write (root included): the cause, and nothing left behind.
    with pytest.raises(StorageError, match=r"output /sys/dskd-probe/out: Operation not permitted"):
        check_writable("/sys/dskd-probe/out")


# --- retries: bounded, and none for what cannot succeed (issue 24) ------------------------------


def test_what_no_retry_can_change_is_not_retried() -> None:
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    from dskd_ray.io.storage import is_storage_failure, is_transient

    def client_error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")

    never = [NoCredentialsError(), client_error("AccessDenied"), client_error("NoSuchBucket"),
             client_error("InvalidAccessKeyId"), PermissionError("denied")]  # fmt: skip
    for error in never:
        assert not is_transient(error) and is_storage_failure(error), error
    again = [EndpointConnectionError(endpoint_url="http://x"), ConnectTimeoutError(endpoint_url="x"),
             client_error("SlowDown"), client_error("InternalError"), ConnectionResetError()]  # fmt: skip
    for error in again:
        assert is_transient(error), error


def test_retries_stop_at_their_time_budget() -> None:
    from dskd_ray.io.storage import with_retries

    now = [0.0]
    calls: list[float] = []

    def unreachable() -> None:
        calls.append(now[0])
        now[0] += 4.0  # each attempt waits out a connect timeout
        raise ConnectionRefusedError("refused")

    with pytest.raises(ConnectionRefusedError):
        with_retries(unreachable, "read x", attempts=100, sleep=lambda s: None,
                     clock=lambda: now[0], budget_s=10.0)  # fmt: skip
    assert len(calls) == 3  # at 0, 4 and 8 s: a fourth would start past the 10 s budget
