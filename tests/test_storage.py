"""Listing and URI rules of `dskd_ray.storage`, on real local folders (no Ray)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import write_textures
from dskd_ray.errors import ConfigError
from dskd_ray.storage import NOT_UTF8, ListingStats, check_output, iter_images, printable_name


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
