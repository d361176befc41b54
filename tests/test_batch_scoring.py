"""Bulk scoring end to end: the real moto S3 server, the real local Ray, real Parquet and PNGs.

The S3 scenario runs in order: a real `python jobs/score.py` subprocess is killed (SIGKILL)
midway, then one full run completes the work, a second run finds nothing new, and a third scores
only the images added or changed since.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from fsspec.core import url_to_fs
from PIL import Image

from conftest import (
    broken_files,
    good_files,
    interrupted,
    make_bucket,
    own_lines,
    texture,
    write_textures,
)
from dskd_ray.config import DSKDConfig, ScoringOptions
from dskd_ray.errors import ConfigError, DataError, StorageError
from dskd_ray.inference.scoring import Scorer
from dskd_ray.io.images import decode_image
from dskd_ray.io.map_png import decode_map_png, map_uri
from dskd_ray.io.storage import with_retries
from dskd_ray.model.checkpoint import Threshold, make_checkpoint, save_checkpoint
from dskd_ray.model.network import DSKD
from dskd_ray.nightly.attempts import SCRATCH_DIR
from dskd_ray.nightly.listing import read_manifest
from dskd_ray.nightly.plan import dry_run
from dskd_ray.nightly.pool import plan_pool
from dskd_ray.nightly.results import PartWriter, commit_run, committed_runs, read_results
from dskd_ray.nightly.run import score_images
from dskd_ray.nightly.stages import decode_batch

REPO = Path(__file__).resolve().parents[1]
N_GOOD = 240


# --- test data ---------------------------------------------------------------------------------


def make_model(folder: Path) -> tuple[Path, float]:
    """A tiny random-teacher checkpoint whose threshold splits its own scores in half."""
    torch.manual_seed(0)
    config = DSKDConfig(memory="none", backbone="resnet18", teacher_weights="random", image_size=64)
    ckpt = make_checkpoint(DSKD(config))
    rng = np.random.default_rng(7)
    images = np.stack([decode_image(texture(rng), 64)[0] for _ in range(16)])
    threshold = float(np.median(Scorer(ckpt, device="cpu").score_batch(images).scores))
    ckpt.threshold = Threshold(threshold, "quantile", 0.5, [])
    path = folder / "model.pt"
    save_checkpoint(ckpt, path)
    return path, threshold


def reference(model: Path, blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The scoring core on the same bytes, decoded the same way: (scores, maps)."""
    scorer = Scorer(str(model), device="cpu", batch_size=32)
    images = np.stack([decode_image(b, scorer.image_size)[0] for b in blobs])
    result = scorer.score_batch(images)
    return result.scores, result.maps


def check_rows_against_core(rows: dict, model: Path, blobs: dict[str, bytes]) -> None:
    """Scores equal the core's, flags follow the threshold, maps decode to the core's maps."""
    ok = [i for i, s in enumerate(rows["status"]) if s == "ok"]
    uris = [rows["image_uri"][i] for i in ok]
    scores, maps = reference(model, [blobs[u] for u in uris])
    got = np.array([rows["score"][i] for i in ok], np.float32)
    np.testing.assert_allclose(got, scores, rtol=1e-4, atol=1e-5)
    fs, _ = url_to_fs(rows["map_uri"][ok[0]], skip_instance_cache=True, use_listings_cache=False)
    pngs = fs.cat([rows["map_uri"][i] for i in ok])  # concurrently, on S3
    for j, i in enumerate(ok):
        assert rows["is_anomalous"][i] == bool(got[j] > rows["threshold"][i])
        with Image.open(io.BytesIO(blobs[uris[j]])) as img:
            assert (rows["width"][i], rows["height"][i]) == img.size
        scale = rows["map_scale"][i]
        png = pngs[fs._strip_protocol(rows["map_uri"][i])]
        decoded = decode_map_png(png, scale)
        assert decoded.shape == maps[j].shape
        assert np.abs(decoded - maps[j]).max() <= 0.51 * scale + 1e-5
        np.testing.assert_allclose(decode_map_png(png), decoded)  # the PNG carries its scale
        with Image.open(io.BytesIO(png)) as img:
            assert img.mode.startswith("I;16") and img.format == "PNG"


# --- S3: the nightly scenario ------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_data(s3_server: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    for bucket in ("bs-models", "bs-images", "bs-scores"):
        make_bucket(s3_server, bucket)
    fs = s3fs.S3FileSystem()
    model, threshold = make_model(tmp_path_factory.mktemp("model"))
    fs.put_file(str(model), "bs-models/m.pt")
    rng = np.random.default_rng(1)
    good = good_files(rng, N_GOOD, "bs-images/")
    broken = {f"bs-images/{k}": v for k, v in broken_files(rng).items()}
    fs.pipe(
        {**good, **{k: b for k, (b, _) in broken.items()}, "bs-images/README.txt": b"not an image"}
    )
    blobs = {f"s3://{k}": v for k, v in good.items()} | {
        f"s3://{k}": b for k, (b, _) in broken.items()
    }
    reasons = {f"s3://{k}": why for k, (_, why) in broken.items()}
    return {"model": model, "model_uri": "s3://bs-models/m.pt", "blobs": blobs, "reasons": reasons}


@pytest.fixture(scope="module")
def killed_then_completed(
    s3_data: dict, ray_cluster, tmp_path_factory: pytest.TempPathFactory
) -> dict:  # noqa: ANN001
    """A real job process killed midway (SIGKILL once its first Parquet part is on S3), then
    one in-process run over the same output."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    out = "s3://bs-scores/nightly"
    log_path = tmp_path_factory.mktemp("killed") / "job.log"
    address = ray_cluster.get_runtime_context().gcs_address
    with open(log_path, "wb") as log:
        job = subprocess.Popen(
            [sys.executable, "jobs/score.py", "s3://bs-images/", "--model", s3_data["model_uri"],
             "--out", out, "--address", address, "--batch-size", "4", "--actor-threads", "1",
             "--rows-per-file", "8"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        parts: list[str] = []
        deadline = time.time() + 180
        try:
            while not parts:
                assert job.poll() is None, (
                    f"job ended before it was killed:\n{log_path.read_text()}"
                )
                assert time.time() < deadline, (
                    f"no Parquet part after 180 s:\n{log_path.read_text()}"
                )
                time.sleep(0.2)
                parts = fs.glob("bs-scores/nightly/results/**/*.parquet", refresh=True)
        finally:
            job.send_signal(signal.SIGKILL)
            job.wait(timeout=30)
    after_kill = {
        "parts": parts,
        "manifests": fs.glob("bs-scores/nightly/_manifests/*", refresh=True),
        "maps": fs.glob("bs-scores/nightly/maps/**/*.png", refresh=True),
        "visible_rows": read_results(out).num_rows,
    }
    summary = score_images(
        "s3://bs-images/", s3_data["model_uri"], out, ScoringOptions(batch_size=16)
    )
    return {"out": out, "after_kill": after_kill, "summary": summary, "log": log_path.read_text()}


def test_killed_run_is_invisible_and_the_next_run_completes_it(
    s3_data: dict, killed_then_completed: dict
) -> None:
    after_kill = killed_then_completed["after_kill"]
    assert after_kill["parts"], (
        "the job was killed before it wrote anything: the test proves nothing"
    )
    assert after_kill["manifests"] == [] and after_kill["maps"]
    assert after_kill["visible_rows"] == 0  # its parts and maps exist, but no reader sees them
    summary = killed_then_completed["summary"]
    assert summary.skipped == 0 and summary.scored + summary.errors == len(s3_data["blobs"])
    runs = committed_runs(killed_then_completed["out"])
    assert [r.run_id for r in runs] == [summary.run_id]
    assert s3fs.S3FileSystem().exists(after_kill["parts"][0])  # still there, still invisible


def test_every_listed_image_has_exactly_one_row(s3_data: dict, killed_then_completed: dict) -> None:
    summary = killed_then_completed["summary"]
    table = read_results(killed_then_completed["out"])
    assert summary.listed == len(s3_data["blobs"]) == table.num_rows
    assert sorted(table["image_uri"].to_pylist()) == sorted(s3_data["blobs"])
    assert summary.other_files == 1  # README.txt: not an image, not listed
    assert summary.errors == len(s3_data["reasons"])
    assert summary.scored == N_GOOD + 3
    assert set(table["run_id"].to_pylist()) == {summary.run_id}
    assert set(table["model_id"].to_pylist()) == {summary.model_id}
    assert all(v for v in table["image_version"].to_pylist())


def test_broken_files_are_error_rows_with_reasons(
    s3_data: dict, killed_then_completed: dict
) -> None:
    rows = read_results(killed_then_completed["out"]).to_pydict()
    errors = {u: i for i, u in enumerate(rows["image_uri"]) if rows["status"][i] == "error"}
    assert set(errors) == set(s3_data["reasons"])
    for uri, why in s3_data["reasons"].items():
        i = errors[uri]
        assert why in rows["error"][i], (uri, rows["error"][i])
        assert rows["score"][i] is None and rows["map_uri"][i] is None
        assert rows["retryable"][i] is False  # the same bytes fail the same way: not retried
    assert all(e is None for e, s in zip(rows["error"], rows["status"], strict=True) if s == "ok")


def test_scores_and_maps_match_the_scoring_core(s3_data: dict, killed_then_completed: dict) -> None:
    table = read_results(killed_then_completed["out"])
    rows = table.to_pydict()
    check_rows_against_core(rows, s3_data["model"], s3_data["blobs"])
    flags = [f for f in rows["is_anomalous"] if f is not None]
    assert 0 < sum(flags) < len(flags)  # the threshold splits them: both verdicts are exercised
    prefix = f"s3://bs-scores/nightly/maps/model={killed_then_completed['summary'].model_id}/"
    map_uris = [u for u in rows["map_uri"] if u]
    assert len(set(map_uris)) == len(map_uris) == N_GOOD + 3
    assert all(u.startswith(prefix) and "/../" not in u and "//" not in u[5:] for u in map_uris)


def test_second_run_scores_nothing_new(s3_data: dict, killed_then_completed: dict) -> None:
    out = killed_then_completed["out"]
    summary = score_images("s3://bs-images/", s3_data["model_uri"], out)
    assert (summary.scored, summary.errors, summary.skipped) == (0, 0, len(s3_data["blobs"]))
    assert read_results(out).num_rows == len(s3_data["blobs"])
    assert len(committed_runs(out)) == 2  # the empty run is recorded too


def test_only_new_and_changed_images_are_scored(s3_data: dict, killed_then_completed: dict) -> None:
    out = killed_then_completed["out"]
    fs = s3fs.S3FileSystem()
    rng = np.random.default_rng(99)
    new = {f"bs-images/new/extra_{i}.png": texture(rng) for i in range(3)}
    changed = "bs-images/line0/cam0/img_0000.png"
    new[changed] = texture(rng)  # same key, new content: a new ETag
    fs.pipe(new)
    before = read_results(out).num_rows
    summary = score_images(
        "s3://bs-images/", s3_data["model_uri"], out, ScoringOptions(batch_size=8)
    )
    assert (summary.scored, summary.errors) == (4, 0)
    assert summary.skipped == len(s3_data["blobs"]) - 1
    rows = read_results(out).filter(pc.equal(read_results(out)["run_id"], summary.run_id))
    assert sorted(rows["image_uri"].to_pylist()) == sorted(f"s3://{k}" for k in new)
    assert read_results(out).num_rows == before + 4
    latest = read_results(out, latest=True)
    assert latest.num_rows == len(s3_data["blobs"]) + 3  # one current row per image
    current = latest.filter(pc.equal(latest["image_uri"], f"s3://{changed}")).to_pydict()
    assert current["run_id"] == [summary.run_id]
    blobs = {**s3_data["blobs"], **{f"s3://{k}": v for k, v in new.items()}}
    check_rows_against_core(rows.to_pydict(), s3_data["model"], blobs)


# --- local folders, no S3 ----------------------------------------------------------------------


def test_local_folders_two_runs_at_once_then_nothing_new(ray_cluster, tmp_path: Path) -> None:  # noqa: ANN001
    """No S3 at all. The real `dskd score` process and an in-process run start together on one
    output: each commits its own complete run, neither corrupts the other's."""
    model, _ = make_model(tmp_path)
    images = tmp_path / "images"
    rng = np.random.default_rng(3)
    files = {**good_files(rng, 24), "bad/empty.png": b"", "bad/corrupt.jpg": rng.bytes(300)}
    files.pop("odd/../../escape.png")  # a local path would really climb: not a file name here
    blobs = {}
    for name, data in files.items():
        path = images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        blobs[str(path.resolve())] = data
    n = len(blobs)
    out = images / "_scores"  # inside the input: its maps must never be listed as images

    job = subprocess.Popen(
        [sys.executable, "-m", "dskd_ray.cli", "score", str(images), "--model", str(model),
         "--out", str(out), "--address", ray_cluster.get_runtime_context().gcs_address,
         "--batch-size", "8", "--rescore"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    mine = score_images(str(images), str(model), str(out), ScoringOptions(batch_size=8))
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    assert f"listed {n}, scored {n - 2}, errors 2, skipped 0" in stdout
    assert (mine.listed, mine.skipped, mine.scored, mine.errors) == (n, 0, n - 2, 2)

    table = read_results(str(out))
    runs = committed_runs(str(out))
    assert len(runs) == 2 and mine.run_id in {r.run_id for r in runs}
    for run in runs:
        rows = table.filter(pc.equal(table["run_id"], run.run_id))
        assert sorted(rows["image_uri"].to_pylist()) == sorted(blobs)
        check_rows_against_core(rows.to_pydict(), model, blobs)
    latest = read_results(str(out), latest=True)
    assert latest.num_rows == n
    map_uris = [u for u in table["map_uri"].to_pylist() if u]
    assert all(Path(u).is_file() and Path(u).is_relative_to(out / "maps") for u in map_uris)
    assert not list(out.rglob("*.tmp"))  # every write was completed or cleaned up

    again = score_images(str(images), str(model), str(out))
    assert (again.listed, again.skipped, again.scored, again.errors) == (n, n, 0, 0)


# --- manifests and dry runs --------------------------------------------------------------------


def test_a_manifest_scores_exactly_its_images_then_skips_them(ray_cluster, tmp_path: Path) -> None:  # noqa: ANN001
    """Parquet without versions, then CSV with them: only the manifest's images get rows, a
    listed file that does not exist is an error row, and nothing else in the folder is read."""
    model, _ = make_model(tmp_path)
    rng = np.random.default_rng(11)
    blobs = {}
    for i in range(8):
        path = tmp_path / "images" / f"img_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(texture(rng))
        blobs[str(path)] = path.read_bytes()
    chosen = sorted(blobs)[:5]
    missing = str(tmp_path / "images" / "deleted-since.png")
    manifest = tmp_path / "tonight.parquet"
    pq.write_table(pa.table({"image_uri": [*chosen, missing], "camera": list("abcdef")}), manifest)
    out = str(tmp_path / "out")

    first = score_images(str(manifest), str(model), out, ScoringOptions(batch_size=4))
    assert (first.listed, first.skipped, first.scored, first.errors, first.gone) == (6, 0, 5, 1, 0)
    rows = read_results(out).to_pydict()
    assert sorted(rows["image_uri"]) == sorted([*chosen, missing])
    [err] = [i for i, u in enumerate(rows["image_uri"]) if u == missing]
    assert rows["status"][err] == "error" and "cannot read" in rows["error"][err]
    assert rows["retryable"][err] is True and rows["image_bytes"][err] is None
    ok = [i for i, s in enumerate(rows["status"]) if s == "ok"]
    assert all(rows["image_version"][i] == "" for i in ok)  # the manifest gave none
    assert all(rows["image_bytes"][i] == len(blobs[rows["image_uri"][i]]) for i in ok)  # read
    check_rows_against_core(rows, model, blobs)

    # Again, as CSV with versions for two of them: those two are new keys, the rest are done;
    # the missing file is retryable, so it is tried again.
    csv = tmp_path / "tonight.csv"
    csv.write_text(
        "image_uri,image_version\n"
        + "".join(f"{u},{'v2' if i < 2 else ''}\n" for i, u in enumerate([*chosen, missing]))
    )
    ahead = dry_run(str(csv), str(model), out)
    assert (ahead.listed, ahead.skipped, ahead.to_score, ahead.unknown_bytes) == (6, 3, 3, 3)
    second = score_images(str(csv), str(model), out, ScoringOptions(batch_size=4))
    assert (second.listed, second.skipped, second.scored, second.errors) == (6, 3, 2, 1)
    assert read_results(out).num_rows == 6 + 3


def test_bad_manifests_are_refused_in_one_line(tmp_path: Path) -> None:
    model, _ = make_model(tmp_path)
    out = str(tmp_path / "out")
    cases = {
        "no-column.csv": ("path\n/a.png\n", "has no column image_uri (it has: path)"),
        "relative.csv": ("image_uri\n/a.png\nb.png\n", "row 2: image_uri 'b.png' is not absolute"),
        "empty.csv": ('image_uri\n/a.png\n""\n', "row 2: image_uri empty"),
        "twice.csv": ("image_uri\n/a.png\n/b.png\n/a.png\n", "lists /a.png more than once"),
        "garbage.parquet": ("not parquet at all", "cannot be read as parquet"),
        # One file, two spellings: the same URI twice once spelled one way (issue 24).
        "spellings.csv": ("image_uri\n/i/a/../a/x.png\n/i/a/x.png\n", "lists /i/a/x.png more"),
        "file-uri.csv": ("image_uri\nfile:///i/y.png\n/i//./y.png\n", "lists /i/y.png more"),
    }
    for name, (text, words) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=re.escape(words)):
            dry_run(str(tmp_path / name), str(model), out)
    # Schemes the product does not read unless the run allows them, refused before anything.
    (tmp_path / "web.csv").write_text("image_uri\n/a.png\nhttp://127.0.0.1:1/b.png\n")
    with pytest.raises(ConfigError, match=re.escape(
        "manifest web.csv, row 2, names a http:// URI: only local paths, file:// and s3:// are "
        "read unless the run allows more (--allow-scheme http)"
    )):  # fmt: skip
        dry_run(str(tmp_path / "web.csv"), str(model), out)
    with pytest.raises(ConfigError, match="INPUT ftp://host/images/ names a ftp:// URI"):
        dry_run("ftp://host/images/", str(model), out)
    with pytest.raises(ConfigError, match="--allow-scheme gs: .*gcsfs"):  # not installed here
        dry_run(str(tmp_path / "web.csv"), str(model), out, ScoringOptions(schemes=("gs",)))
    (tmp_path / "odd.csv").write_text("image_uri\n/i/./b//c/../d.png\nFILE:///i/e.png\n")
    assert read_manifest(str(tmp_path / "odd.csv"))["image_uri"].to_pylist() == [
        "/i/b/d.png", "/i/e.png",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "score", str(tmp_path / "relative.csv"), "--model",
         str(model), "--out", out],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == (
        "dskd: error: manifest relative.csv, row 2: image_uri 'b.png' is not absolute "
        "(a path from / or a URI)"
    )
    assert not Path(out).exists()


def test_what_can_never_be_read_is_not_retried_every_night(s3_server: dict, tmp_path: Path) -> None:
    """A folder where an image should be (local, or a prefix on S3), a scheme without its
    filesystem: error rows that the next run does not try again. A missing file may come back:
    that one is retried."""
    make_bucket(s3_server, "never-read")
    s3fs.S3FileSystem().pipe({"never-read/folder/x.png": texture(np.random.default_rng(0))})
    (tmp_path / "a-folder").mkdir()
    uris = [str(tmp_path / "a-folder"), "s3://never-read/folder", "s3://never-read/folder/",
            "gs://bucket/x.png", str(tmp_path / "missing.png")]  # fmt: skip
    n = len(uris)
    rows = decode_batch(
        {"image_uri": np.array(uris, object), "image_version": np.array([""] * n, object),
         "image_bytes": np.full(n, -1)}, 64, 2,
    )  # fmt: skip
    assert list(rows["status"]) == ["error"] * n
    assert list(rows["retryable"]) == [False, False, False, False, True], list(rows["error"])
    assert rows["error"][0].startswith("cannot read: not a file: ")
    assert rows["error"][1] == "cannot read: not a file: a folder (a prefix on object storage)"
    assert rows["error"][3].startswith("cannot read: no filesystem for this URI: ")


def test_dry_run_lists_diffs_and_counts_but_writes_nothing(tmp_path: Path) -> None:
    """Half the folder already scored by a committed run (with its index), one scored image
    deleted since: the dry run says what tonight's run would do, from the real CLI."""
    from dskd_ray.nightly.listing import list_inputs
    from dskd_ray.nightly.results import RESULT_SCHEMA
    from dskd_ray.nightly.run_index import ModelIndex

    model, _ = make_model(tmp_path)
    model_id = Scorer(str(model), device="cpu").model_id
    images = tmp_path / "images"
    paths = write_textures(images / "a", 6) + write_textures(images / "b", 4, seed=1)
    (images / "notes.txt").write_text("not an image")
    listing = list_inputs(str(images), str(tmp_path / "out")).table
    sizes = dict(
        zip(listing["image_uri"].to_pylist(), listing["image_bytes"].to_pylist(), strict=True)
    )
    done = listing.filter(pc.is_in(listing["image_uri"], pa.array([str(p) for p in paths[:5]])))
    run_id = "20260101T000000Z-aaaaaa"
    gone_uri = str(images / "a" / "deleted.png")
    n = done.num_rows + 1
    rows = {name: pa.nulls(n, RESULT_SCHEMA.field(name).type) for name in RESULT_SCHEMA.names}
    rows |= {
        "image_uri": pa.array([*done["image_uri"].to_pylist(), gone_uri]),
        "image_version": pa.array([*done["image_version"].to_pylist(), "v"]),
        "status": pa.array(["ok"] * n), "retryable": pa.array([False] * n),
        "model_id": pa.array([model_id] * n), "run_id": pa.array([run_id] * n),
    }  # fmt: skip
    table = pa.table(rows, schema=RESULT_SCHEMA)
    out = tmp_path / "out"
    index = ModelIndex.load(str(out), model_id)
    writer = PartWriter(str(out), run_id)
    writer.write(table)
    files = writer.close()
    commit_run(str(out), run_id, files, model_id=model_id)
    index.write(run_id, files)
    before = sorted(p for p in out.rglob("*"))

    result = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "score", str(images), "--model", str(model),
         "--out", str(out), "--dry-run"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    left = sum(sizes[str(p)] for p in paths[5:])
    kb = lambda b: f"{b / 1000:.1f} KB"  # noqa: E731
    assert result.stdout.startswith(
        f"dry run: listed 10 ({kb(sum(sizes.values()))}), skipped 5 (already scored), "
        f"to score 5 ({kb(left)}), gone 1, other files 1;"
    ), result.stdout
    assert sorted(p for p in out.rglob("*")) == before  # nothing written
    fresh = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "score", str(images), "--model", str(model),
         "--out", str(tmp_path / "never"), "--dry-run", "--rescore"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "listed 10" in fresh.stdout and "to score 10" in fresh.stdout, fresh.stderr
    assert not (tmp_path / "never").exists()


def test_a_handful_of_images_is_scored_in_process_with_the_same_rows(tmp_path: Path) -> None:
    """No Ray named or running: `dskd score` scores a few images in its own process (no Ray
    start), through the same stages, into the same committed rows and maps."""
    model, _ = make_model(tmp_path)
    images = tmp_path / "images"
    rng = np.random.default_rng(4)
    blobs = {}
    for i in range(9):
        path = images / f"img_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(texture(rng))
        blobs[str(path)] = path.read_bytes()
    (images / "corrupt.png").write_bytes(rng.bytes(300))
    blobs[str(images / "corrupt.png")] = b""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "score", str(images), "--model", str(model),
         "--out", str(out), "--batch-size", "4", "-v"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "scoring 10 images in this process" in result.stderr
    assert "Started a local Ray instance" not in result.stderr + result.stdout
    assert "listed 10, scored 9, errors 1, skipped 0" in result.stdout
    rows = read_results(str(out)).to_pydict()
    assert sorted(rows["image_uri"]) == sorted(blobs)
    check_rows_against_core(rows, model, blobs)
    [bad] = [i for i, u in enumerate(rows["image_uri"]) if u.endswith("corrupt.png")]
    assert rows["status"][bad] == "error" and "not a recognised image format" in rows["error"][bad]


# --- dead workers -------------------------------------------------------------------------------


def _pids(pattern: str) -> list[int]:
    """Processes whose title (Ray sets it to the task or actor it runs) contains `pattern`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if title.startswith("ray::") and pattern in title:
                found.append(int(entry.name))
    return found


def _own_temp_dir(tmp_path: Path, env: dict[str, str] | None = None) -> tuple[dict[str, str], Path]:
    """(`env` or this environment, with a temp directory of the test's own for the `dskd score`
    process and, through the job's runtime_env, its Ray workers; that directory)."""
    import json

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ if env is None else env)
    job = json.loads(env.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    job.setdefault("runtime_env", {}).setdefault("env_vars", {})["TMPDIR"] = str(temp)
    return env | {"TMPDIR": str(temp), "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}, temp


def _check_no_scratch_left(temp: Path) -> None:
    """A run leaves nothing of ours in the temp directory; above all no folder named like the
    package, which shadows the installed one for anyone whose working directory it is (issue
    25). (torch leaves its own caches there, `torchinductor_<user>`.)"""
    ours = [p.name for p in temp.iterdir() if "dskd" in p.name.lower()]
    assert ours == [], (ours, list((temp / SCRATCH_DIR).rglob("*")))


def _score_and_kill(ray_cluster, tmp_path: Path, blobs: dict[str, bytes], pattern: str,  # noqa: ANN001
                    ready: Callable[[], bool], env: dict[str, str] | None = None,
                    ) -> tuple[list[int], subprocess.CompletedProcess]:  # fmt: skip
    """A real `dskd score` job on the session's Ray; SIGKILL the first process whose title
    contains `pattern` once `ready()` says so. Returns (killed pids, the job's result)."""
    model, _ = make_model(tmp_path)
    job = subprocess.Popen(
        [sys.executable, "-m", "dskd_ray.cli", "score", str(tmp_path / "images"), "--model",
         str(model), "--out", str(tmp_path / "out"), "--address",
         ray_cluster.get_runtime_context().gcs_address, "--batch-size", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    killed: list[int] = []
    deadline = time.time() + 900  # a guard against a hang, not a timing: shared CI is slow
    try:
        while not killed and job.poll() is None and time.time() < deadline:
            if ready():
                for pid in _pids(pattern):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.02)
        stdout, stderr = job.communicate(timeout=900)  # a hang (ray-project/ray#62746) fails here
    finally:
        if job.poll() is None:  # the test failed: leave no job behind on the session's Ray
            job.kill()
            job.wait()
    return killed, subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


def _write_images(folder: Path, n: int, side: int | None = None) -> dict[str, bytes]:
    rng = np.random.default_rng(8)
    blobs = {}
    for i in range(n):
        path = folder / f"line{i % 2}" / f"img_{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if side:  # big enough that decoding a block takes a while: a task to catch running
            yy, xx = np.mgrid[0:side, 0:side] / side
            img = 0.5 + 0.4 * np.sin(40 * (xx + yy * (1 + i / n)))[..., None] * np.ones(3)
            Image.fromarray((img * 255).astype(np.uint8)).save(path)
        else:
            path.write_bytes(texture(rng))
        blobs[str(path)] = path.read_bytes()
    return blobs


def _check_one_row_each(tmp_path: Path, blobs: dict[str, bytes], result) -> None:  # noqa: ANN001
    assert result.returncode == 0, result.stderr[-3000:]
    n = len(blobs)
    assert f"listed {n}, scored {n}, errors 0" in result.stdout
    [run] = committed_runs(str(tmp_path / "out"))
    rows = read_results(str(tmp_path / "out")).to_pydict()
    assert sorted(rows["image_uri"]) == sorted(blobs)  # every image exactly once
    assert set(rows["run_id"]) == {run.run_id}
    check_rows_against_core(rows, tmp_path / "model.pt", blobs)


def test_a_scoring_actor_killed_mid_run_still_commits_one_row_per_image(
    ray_cluster,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    """SIGKILL the scoring actor once its first maps are written: Ray restarts it (the model
    loads again) and retries its batch; the run commits every image exactly once, and does not
    hang on the dead actor of its one-actor pool. The attempt counters it kept on the node's
    disk are gone at the end."""
    blobs = _write_images(tmp_path / "images", 24)
    maps = tmp_path / "out" / "maps"
    env, temp = _own_temp_dir(tmp_path)
    killed, result = _score_and_kill(
        ray_cluster, tmp_path, blobs, "MapBatches(ScoringActor)",
        lambda: maps.is_dir() and any(maps.rglob("*.png")), env,
    )  # fmt: skip
    assert killed, f"no scoring actor was seen to kill:\n{result.stderr[-3000:]}"
    assert len(list(maps.rglob("*.png"))) < 2 * len(blobs)
    _check_one_row_each(tmp_path, blobs, result)
    _check_no_scratch_left(temp)


def test_ctrl_c_on_ray_exits_130_commits_nothing_and_leaves_no_scratch(
    ray_cluster,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    """Ctrl-C once the first maps are written: one line, exit 130 (a script or a scheduler
    must not carry on), no manifest, and no scratch folder left in the temp directory. Enough
    images that the run is still going when the Ctrl-C lands on a loaded machine (at 48 it
    once finished first)."""
    _write_images(tmp_path / "images", 160)
    model, _ = make_model(tmp_path)
    out = tmp_path / "out"
    env, temp = _own_temp_dir(tmp_path)
    result = interrupted(
        ["score", str(tmp_path / "images"), "--model", str(model), "--out", str(out),
         "--address", ray_cluster.get_runtime_context().gcs_address, "--batch-size", "4"],
        lambda _: (out / "maps").is_dir() and any((out / "maps").rglob("*.png")), tmp_path, env,
    )  # fmt: skip
    assert result.returncode == 130, result.stderr[-3000:]
    assert own_lines(result.stderr)[-1] == "dskd: interrupted"
    assert "committed" not in result.stdout and not (out / "_manifests").exists()
    _check_no_scratch_left(temp)


def test_a_decode_worker_killed_mid_task_still_commits_one_row_per_image(
    ray_cluster,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    """SIGKILL a worker process while it decodes a block: Ray runs the task again elsewhere."""
    blobs = _write_images(tmp_path / "images", 12, side=1800)
    killed, result = _score_and_kill(
        ray_cluster, tmp_path, blobs, "MapBatches(decode_batch)", lambda: True
    )
    assert killed, f"no decode task was caught running:\n{result.stderr[-3000:]}"
    _check_one_row_each(tmp_path, blobs, result)


# --- images that crash their worker -------------------------------------------------------------

CRASH_HOOKS = REPO / "tests" / "crash_hooks" / "sitecustomize.py"
CRASH = b"DSKD-CRASH:"  # see tests/crash_hooks: the decoder of such bytes dies by a real signal


def _crash_folder(tmp_path: Path, scoring_crash: bool) -> tuple[dict[str, bytes], dict[str, str]]:
    """Normal images, plus images that kill the process decoding them (SIGSEGV, always; SIGKILL,
    always; SIGSEGV once, then decode) and, with `scoring_crash`, one that kills the scoring
    actor (every pixel 13). Returns (uri → bytes a plain decode scores, uri → the case)."""
    rng = np.random.default_rng(21)
    images = tmp_path / "images"
    files = {f"good/img_{i:02d}.png": texture(rng) for i in range(10)}
    once = texture(rng)
    cases = {
        "crash/segv.png": (CRASH + b"segv\n" + texture(rng), "segv"),
        "crash/kill.png": (CRASH + b"kill\n" + texture(rng), "kill"),
        "crash/once.png": (CRASH + b"once-a\n" + once, "once"),
    }
    if scoring_crash:
        buffer = io.BytesIO()
        Image.new("RGB", (80, 80), (13, 13, 13)).save(buffer, format="PNG")
        cases["crash/thirteen.png"] = (buffer.getvalue(), "scoring")
    blobs, kinds = {}, {}
    for name, data in {**files, **{k: b for k, (b, _) in cases.items()}}.items():
        path = images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        blobs[str(path)] = data
    for name, (_, kind) in cases.items():
        kinds[str(images / name)] = kind
    blobs[str(images / "crash/once.png")] = once  # what it decodes to, once it does
    return blobs, kinds


def _hooked_env(tmp_path: Path) -> dict[str, str]:
    """This environment with the crash hooks first on PYTHONPATH, for the `dskd score` process
    and (through the job's runtime_env, as `ray job submit` passes one) its Ray workers."""
    import json

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    shutil.copy(CRASH_HOOKS, hooks / "sitecustomize.py")
    path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    job = {"runtime_env": {"env_vars": {"PYTHONPATH": path}}}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"PYTHONPATH": path, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}


def _check_crash_rows(tmp_path: Path, blobs: dict[str, bytes], kinds: dict[str, str],
                      result: subprocess.CompletedProcess) -> None:  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    n, failed = len(blobs), sum(k != "once" for k in kinds.values())
    assert f"listed {n}, scored {n - failed}, errors {failed}" in result.stdout, result.stdout
    rows = read_results(str(tmp_path / "out")).to_pydict()
    assert sorted(rows["image_uri"]) == sorted(blobs)  # every image exactly once
    row = {u: i for i, u in enumerate(rows["image_uri"])}
    expected = {
        "segv": ("decoder crashed: killed by signal 11 (SIGSEGV) on this image, twice", False),
        "kill": ("decoder crashed: killed by signal 9 (SIGKILL: out of memory?)", True),
        "scoring": ("scoring crashed: the scoring process died 2 times scoring it", True),
    }
    for uri, kind in kinds.items():
        i = row[uri]
        if kind == "once":  # died once, decoded by a new decoder: scored like any image
            assert rows["status"][i] == "ok" and rows["width"][i] > 0
            continue
        words, retryable = expected[kind]
        assert rows["status"][i] == "error" and words in rows["error"][i], rows["error"][i]
        assert rows["retryable"][i] is retryable and rows["score"][i] is None
    ok = {u for u in blobs if rows["status"][row[u]] == "ok"}
    check_rows_against_core(
        {k: [v[row[u]] for u in sorted(ok)] for k, v in rows.items()}, tmp_path / "model.pt", blobs
    )


def test_images_that_crash_the_decoder_or_the_actor_are_error_rows_on_ray(
    ray_cluster,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    """On Ray: an image that kills its decoder by a real signal is tried in a new decoder,
    then is an error row; one that kills the scoring actor (twice with its batch, twice alone)
    is an error row; every other image is scored, and the run ends, committed."""
    blobs, kinds = _crash_folder(tmp_path, scoring_crash=True)
    make_model(tmp_path)
    job = subprocess.Popen(
        [sys.executable, "-m", "dskd_ray.cli", "score", str(tmp_path / "images"), "--model",
         str(tmp_path / "model.pt"), "--out", str(tmp_path / "out"), "--address",
         ray_cluster.get_runtime_context().gcs_address, "--batch-size", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_hooked_env(tmp_path),
    )  # fmt: skip
    try:
        stdout, stderr = job.communicate(timeout=900)  # retrying without end fails here
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    result = subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)
    _check_crash_rows(tmp_path, blobs, kinds, result)
    assert (tmp_path / "hooks" / "crashed-once-a").exists()  # it did die once


def test_images_that_crash_the_decoder_are_error_rows_in_process(tmp_path: Path) -> None:
    """No Ray: the decoder is the `dskd score` process's own child; the process survives."""
    blobs, kinds = _crash_folder(tmp_path, scoring_crash=False)
    make_model(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "score", str(tmp_path / "images"), "--model",
         str(tmp_path / "model.pt"), "--out", str(tmp_path / "out"), "--batch-size", "4", "-v"],
        capture_output=True, text=True, timeout=600, env=_hooked_env(tmp_path),
    )  # fmt: skip
    assert "in this process" in result.stderr
    _check_crash_rows(tmp_path, blobs, kinds, result)


# --- the parts, without Ray --------------------------------------------------------------------


def test_map_keys_never_leave_the_maps_folder() -> None:
    root = "s3://out/maps"
    for name in [
        "s3://b/../../etc/passwd.png",
        "s3://b/a/./../x.png",
        "/data/..../..",
        "s3://b//x.png",
        "s3://b/ .png",
    ]:
        key = map_uri(root, name, "v1", "abc123")
        rest = key.removeprefix(root + "/")
        assert key.startswith(root + "/model=abc123/") and key.endswith(".png")
        assert all(seg not in ("", ".", "..") for seg in rest.split("/")), key
    # Names that sanitise alike, or versions of one image, never share a map.
    keys = {
        map_uri(root, u, v, "m") for u in ("s3://b/a b.png", "s3://b/a_b.png") for v in ("1", "2")
    }
    assert len(keys) == 4


def test_transient_errors_are_retried_permanent_ones_are_not() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    delays: list[float] = []
    assert with_retries(flaky, "read x", sleep=delays.append) == "ok"
    assert len(calls) == 3 and len(delays) == 2

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, "read y", sleep=delays.append)
    assert len(calls) == 1


def test_uncommitted_runs_are_invisible(tmp_path: Path) -> None:
    import pyarrow as pa

    from dskd_ray.nightly.results import RESULT_SCHEMA

    out = str(tmp_path / "out")
    row = {name: [None] for name in RESULT_SCHEMA.names} | {
        "image_uri": ["/x.png"], "image_version": ["v"], "model_id": ["m"], "status": ["ok"],
        "run_id": ["20260101T000000Z-aaaaaa"],
    }  # fmt: skip
    writer = PartWriter(out, "20260101T000000Z-aaaaaa", rows_per_file=1)
    writer.write(pa.table(row, schema=RESULT_SCHEMA))
    files = writer.close()
    (tmp_path / "out" / "_manifests").mkdir()
    (tmp_path / "out" / "_manifests" / ".run=x.json.123.tmp").write_text("{")  # a write in flight
    assert read_results(out).num_rows == 0
    commit_run(out, "20260101T000000Z-aaaaaa", files, model_id="m")
    assert read_results(out).num_rows == 1
    assert read_results(out, model_id="other").num_rows == 0


def test_read_results_on_a_missing_path_says_so(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_results(str(tmp_path / "typo"))
    (tmp_path / "fresh").mkdir()
    assert read_results(str(tmp_path / "fresh")).num_rows == 0  # there, but no run yet
    assert read_results(str(tmp_path / "typo"), missing_ok=True).num_rows == 0


def test_read_results_on_an_unreachable_store_raises_a_project_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conftest import _free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # refused
    # One botocore attempt per call: its own 5 under our 5 take ~40 s to say the same thing.
    for name, value in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true"),
                        ("AWS_MAX_ATTEMPTS", "1")]:  # fmt: skip
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made for moto would answer
    try:
        with pytest.raises(StorageError, match="s3://bs-nowhere/out: .*127.0.0.1") as failed:
            read_results("s3://bs-nowhere/out")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert "\n" not in str(failed.value)


def test_pool_never_claims_every_cpu() -> None:
    for cpus in (1, 2, 4, 8, 16, 64):
        plan = plan_pool({"CPU": float(cpus)}, ScoringOptions())
        assert plan.device == "cpu" and plan.max_actors >= 1
        # Room for a decode task and a map-write task beside every actor, and for a second run.
        assert 2 * plan.max_actors * plan.actor_cpus + plan.task_cpus <= max(cpus, 2)
        assert plan.actor_cpus != plan.task_cpus  # else Ray Data fuses decoding into the actor
    gpu = plan_pool({"CPU": 16.0, "GPU": 2.0}, ScoringOptions())
    assert (gpu.device, gpu.max_actors, gpu.actor_gpus) == ("cuda", 2, 1.0)
    assert plan_pool({"CPU": 16.0, "GPU": 2.0}, ScoringOptions(device="cpu")).device == "cpu"


def test_auto_runs_onnxruntime_on_cpus_when_it_pays_and_torch_otherwise() -> None:
    auto = ScoringOptions()
    assert auto.backend == "auto"
    big, few = auto.onnx_export_min, auto.onnx_export_min - 1
    assert auto.resolve_backend("cpu", big, False, True)[0] == "onnxruntime"  # exports, pays
    assert auto.resolve_backend("cpu", 3, True, True)[0] == "onnxruntime"  # cached: any size
    backend, why = auto.resolve_backend("cpu", few, False, True)
    assert backend == "torch" and f"fewer than the {big}" in why  # the export would not pay
    assert auto.resolve_backend("cpu", big, True, False)[0] == "torch"  # not installed
    for asked, device in [
        (ScoringOptions(), "cuda"),
        (ScoringOptions(device="cuda"), "cuda:1"),
        (ScoringOptions(precision="bf16"), "cpu"),
        (ScoringOptions(compile=True), "cpu"),
        (ScoringOptions(backend="torch"), "cpu"),
    ]:
        asked.validate()  # auto with PyTorch-only options is no error: it means torch
        assert asked.resolve_backend(device, big, True, True)[0] == "torch", (asked, device)
    assert ScoringOptions(backend="onnxruntime").resolve_backend("cpu", 1, False, True)[0] == (
        "onnxruntime"
    )
    # On a GPU cluster auto scores with torch on the GPUs; an explicit onnxruntime stays on CPUs.
    assert plan_pool({"CPU": 16.0, "GPU": 2.0}, ScoringOptions()).device == "cuda"
    onnx = ScoringOptions(backend="onnxruntime")
    assert plan_pool({"CPU": 16.0, "GPU": 2.0}, onnx).device == "cpu"


def test_an_auto_run_on_onnxruntime_writes_the_rows_of_a_torch_run(tmp_path: Path) -> None:
    """auto on CPUs runs the exported graph (here: exported for this run, then cached) and
    writes PyTorch's rows within the export's tolerances; the manifest and the summary say
    which backend ran."""
    from dskd_ray.onnx.export import MAP_TOLERANCE, SCORE_TOLERANCE

    model, _ = make_model(tmp_path)
    blobs = _write_images(tmp_path / "images", 12)
    images, out = str(tmp_path / "images"), tmp_path / "out"
    torch_run = score_images(
        images, str(model), str(out / "torch"), ScoringOptions(backend="torch")
    )
    auto = ScoringOptions(device="cpu", onnx_export_min=0)  # export pays at any size
    auto_run = score_images(images, str(model), str(out / "auto"), auto)
    assert (torch_run.backend, auto_run.backend) == ("torch", "onnxruntime")
    assert "with onnxruntime" in auto_run.format()
    [manifest] = [r.manifest for r in committed_runs(str(out / "auto"))]
    assert (manifest["options"]["backend"], manifest["options"]["backend_asked"]) == (
        "onnxruntime", "auto",
    )  # fmt: skip
    assert manifest["summary"]["backend"] == "onnxruntime"
    assert committed_runs(str(out / "torch"))[0].manifest["options"]["backend"] == "torch"

    key = "image_uri"
    want = read_results(str(out / "torch")).sort_by(key).to_pydict()
    got = read_results(str(out / "auto")).sort_by(key).to_pydict()
    assert got[key] == want[key] == sorted(blobs) and set(got["status"]) == {"ok"}
    scores = np.array(want["score"])
    assert np.abs(np.array(got["score"]) - scores).max() <= SCORE_TOLERANCE * np.abs(scores).max()
    assert got["is_anomalous"] == want["is_anomalous"]
    for mine, theirs, scale in zip(got["map_uri"], want["map_uri"], want["map_scale"], strict=True):
        a = decode_map_png(Path(mine).read_bytes())
        b = decode_map_png(Path(theirs).read_bytes())
        assert np.abs(a - b).max() <= scale + MAP_TOLERANCE * np.abs(b).max()  # one 16-bit step

    # The next run of the model, however small, finds its graph in the cache.
    again = score_images(images, str(model), str(out / "again"), ScoringOptions(device="cpu"))
    assert again.backend == "onnxruntime"


def test_a_new_threshold_is_a_new_model_and_every_verdict_is_its_rows_score_over_threshold(
    ray_cluster,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    """The same weights calibrated again with another threshold used to keep the model id, so
    the ONNX graph cached for the first checkpoint flagged the second's images by the first's
    threshold. The id covers the threshold: every backend, in process and on Ray, writes rows
    whose verdict is that row's score over that row's threshold."""
    from dskd_ray.model.checkpoint import load_checkpoint

    model, median = make_model(tmp_path)
    images = str(tmp_path / "images")
    _write_images(Path(images), 12)
    strict = load_checkpoint(model)
    strict.threshold = Threshold(1e6, "quantile", 0.5, [])  # nothing is anomalous under it
    save_checkpoint(strict, tmp_path / "strict.pt")
    assert strict.network_id == load_checkpoint(model).network_id
    assert strict.model_id != load_checkpoint(model).model_id
    onnx = ScoringOptions(device="cpu", backend="onnxruntime")
    first = score_images(images, str(tmp_path / "strict.pt"), str(tmp_path / "strict"), onnx)
    assert first.backend == "onnxruntime"  # the strict model's graph is now in the cache

    for name, options, address in [
        ("onnx", onnx, None),
        ("torch", ScoringOptions(device="cpu", backend="torch"), None),
        (
            "onnx-ray",
            dataclasses.replace(onnx, in_process_max=0),
            ray_cluster.get_runtime_context().gcs_address,
        ),
    ]:
        summary = score_images(images, str(model), str(tmp_path / name), options, address=address)
        rows = read_results(str(tmp_path / name)).to_pydict()
        assert summary.scored == 12 and set(rows["threshold"]) == {median}, name
        verdicts = [s > t for s, t in zip(rows["score"], rows["threshold"], strict=True)]
        assert rows["is_anomalous"] == verdicts and 0 < sum(verdicts) < 12, name
    assert not any(read_results(str(tmp_path / "strict"))["is_anomalous"].to_pylist())


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    model, _ = make_model(tmp_path)
    missing = tmp_path / "no-such-folder"
    result = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "score", str(missing), "--model", str(model),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == f"dskd: error: {missing} does not exist"
    assert not (tmp_path / "out").exists()  # nothing written for a run that never started


# --- bad inputs, local folders -----------------------------------------------------------------


def make_nan_model(folder: Path) -> Path:
    """A checkpoint whose weights give NaN and whose model id matches them (re-saved whole):
    loading accepts it, so only the scores can tell."""
    torch.manual_seed(0)
    model = DSKD(
        DSKDConfig(memory="none", backbone="resnet18", teacher_weights="random", image_size=64)
    )
    with torch.no_grad():
        for p in model.student_parameters():
            p.fill_(float("nan"))
    ckpt = make_checkpoint(model)
    ckpt.threshold = Threshold(1.0, "quantile", 0.5, [])
    path = folder / "nan.pt"
    save_checkpoint(ckpt, path)
    return path


@pytest.fixture(scope="module")
def hostile_folder(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: ANN001
    """One input folder with every kind of bad entry, scored three times into an output that
    lies inside it but is spelled through a symlink:

    1. a model whose weights give NaN; 2. the good model; 3. the good model with --rescore,
    after one image was deleted.
    """
    tmp = tmp_path_factory.mktemp("hostile")
    images = tmp / "images"
    rng = np.random.default_rng(5)
    good = {f"good/img_{i}.png": texture(rng) for i in range(4)}
    for name, data in good.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(data)
    # A name that is not UTF-8 (Linux names are bytes): made through the bytes API.
    bad_name = os.fsencode(images / "good") + b"/caf\xe9-\xff.png"
    with open(bad_name, "wb") as f:
        f.write(texture(rng))
    outside = tmp / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(texture(rng))
    (images / "links").mkdir()
    os.symlink(images / "good" / "img_0.png", images / "links" / "inside.png")  # followed
    os.symlink(outside / "secret.png", images / "links" / "outside.png")  # not: outside INPUT
    os.symlink(images / "nowhere.png", images / "links" / "broken.png")  # not: nowhere
    os.symlink(images / "good", images / "links" / "folder")  # not: listed under good/ anyway
    os.symlink(images, tmp / "alias")  # the output, spelled through this, is inside INPUT
    out = tmp / "alias" / "scores"

    good_model, _ = make_model(tmp)
    nan_model = make_nan_model(tmp)
    first = score_images(str(images), str(nan_model), str(out), ScoringOptions(batch_size=8))
    second = score_images(str(images), str(good_model), str(out), ScoringOptions(batch_size=8))
    second_rows = read_results(str(out), second.model_id).to_pydict()
    second_maps = {u: Path(u).read_bytes() for u in second_rows["map_uri"] if u}
    (images / "good" / "img_3.png").unlink()
    third = score_images(
        str(images), str(good_model), str(out), ScoringOptions(batch_size=8, rescore=True)
    )
    return {
        "images": images, "out": out, "good": good, "first": first, "second": second,
        "third": third, "second_maps": second_maps,
    }  # fmt: skip


def test_nan_scores_are_error_rows_and_a_good_model_scores_them_again(hostile_folder: dict) -> None:
    first, second = hostile_folder["first"], hostile_folder["second"]
    n = len(hostile_folder["good"]) + 2  # the four images, the non-UTF-8 name, the inside link
    assert (first.listed, first.scored, first.errors) == (n, 0, n)
    rows = read_results(str(hostile_folder["out"]), first.model_id).to_pylist()
    nan_rows = [r for r in rows if "not finite" in (r["error"] or "")]
    assert len(nan_rows) == n - 1  # all but the unreadable name
    assert all(r["status"] == "error" and r["retryable"] is False for r in nan_rows)
    assert all(r["score"] is None and r["is_anomalous"] is None for r in nan_rows)
    # Another model is another id: the NaN rows do not mark the images as done for it.
    assert second.model_id != first.model_id
    assert (second.listed, second.skipped, second.scored, second.errors) == (n, 0, n - 1, 1)


def test_a_name_that_is_not_utf8_is_an_error_row_not_a_failed_night(hostile_folder: dict) -> None:
    second = hostile_folder["second"]
    rows = read_results(str(hostile_folder["out"]), second.model_id).to_pylist()
    [row] = [r for r in rows if "caf" in r["image_uri"] and r["run_id"] == second.run_id]
    assert row["image_uri"].endswith("/good/caf\\xe9-\\xff.png")  # escaped, valid UTF-8
    assert row["status"] == "error" and "not valid UTF-8" in row["error"]
    assert row["retryable"] is False


def test_symlinks_are_counted_and_followed_only_inside_input(hostile_folder: dict) -> None:
    second = hostile_folder["second"]
    assert (second.symlinks, second.symlinks_skipped) == (4, 3)
    rows = read_results(str(hostile_folder["out"]), second.model_id).to_pylist()
    uris = {r["image_uri"] for r in rows}
    links = hostile_folder["images"] / "links"
    assert str(links / "inside.png") in uris
    assert not any("secret" in u or "/links/folder/" in u or "broken" in u for u in uris)
    manifest = committed_runs(str(hostile_folder["out"]))[-2].manifest
    assert manifest["summary"]["symlinks"] == 4 and manifest["summary"]["symlinks_skipped"] == 3


def test_output_inside_input_through_a_symlink_is_never_listed(hostile_folder: dict) -> None:
    # The second run wrote maps into INPUT/scores (spelled alias/scores); the third lists no
    # more images than the second did, less the one deleted.
    second, third = hostile_folder["second"], hostile_folder["third"]
    assert second.scored > 0 and (hostile_folder["images"] / "scores" / "maps").is_dir()
    assert third.listed == second.listed - 1
    rows = read_results(str(hostile_folder["out"])).to_pylist()
    assert not any("/scores/" in r["image_uri"] for r in rows)


def test_a_deleted_image_reads_as_gone_and_rescore_keeps_old_maps(hostile_folder: dict) -> None:
    out, third = str(hostile_folder["out"]), hostile_folder["third"]
    assert third.gone == 1
    latest = read_results(out, third.model_id, latest=True).to_pylist()
    deleted = str(hostile_folder["images"] / "good" / "img_3.png")
    [row] = [r for r in latest if r["image_uri"] == deleted]
    assert row["status"] == "gone" and row["run_id"] == third.run_id and row["score"] is None
    assert len(latest) == third.listed + 1
    # --rescore wrote new maps; every map an earlier committed row points at is untouched.
    for uri, data in hostile_folder["second_maps"].items():
        assert Path(uri).read_bytes() == data
    new_maps = {r["map_uri"] for r in latest if r["run_id"] == third.run_id and r["map_uri"]}
    assert new_maps and not new_maps & set(hostile_folder["second_maps"])
