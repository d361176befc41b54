"""The per-model index of what is scored: one file, folds, overlapping and retired runs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dskd_ray.nightly.results import RESULT_SCHEMA, PartWriter, commit_run
from dskd_ray.nightly.run_index import (
    INDEX_COLUMNS,
    INDEX_DIR,
    INDEX_FILE,
    ModelIndex,
    hash_rows,
    read_parts,
)

MODEL = "m1"


def rows(run_id: str, images: dict[str, tuple[str, str, bool]], model: str = MODEL) -> pa.Table:
    """RESULT_SCHEMA rows of one run: uri → (version, status, retryable)."""
    n = len(images)
    columns = {name: pa.nulls(n, RESULT_SCHEMA.field(name).type) for name in RESULT_SCHEMA.names}
    columns |= {
        "image_uri": pa.array(list(images), pa.string()),
        "image_version": pa.array([v for v, _, _ in images.values()], pa.string()),
        "status": pa.array([s for _, s, _ in images.values()], pa.string()),
        "retryable": pa.array([r for _, _, r in images.values()], pa.bool_()),
        "model_id": pa.array([model] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
    }
    return pa.table(columns, schema=RESULT_SCHEMA)


def commit(out: str, run_id: str, table: pa.Table, index: bool = True, model: str = MODEL) -> None:
    """A run as `score_images` commits it: its model's index read before it starts, parts, the
    manifest, then the index rewritten."""
    before = ModelIndex.load(out, model)
    writer = PartWriter(out, run_id, rows_per_file=2)
    writer.write(table)
    files = writer.close()
    commit_run(out, run_id, files, model_id=model)
    if index:
        before.write(run_id, files)


def latest(out: str, model: str = MODEL) -> dict[str, tuple[str, str, str]]:
    return {
        r["image_uri"]: (r["image_version"], r["status"], r["run_id"])
        for r in ModelIndex.load(out, model).rows().to_pylist()
    }


def done(out: str, model: str = MODEL) -> set[int]:
    return set(ModelIndex.load(out, model).done_keys().tolist())


def key(uri: str, version: str) -> int:
    return int(hash_rows([pa.array([uri]), pa.array([version])])[0])


def index_file(tmp_path: Path, model: str = MODEL) -> Path:
    return tmp_path / "out" / INDEX_DIR / f"model={model}" / INDEX_FILE


R1, R2, R3, R4 = (f"20260101T00000{i}Z-aaaaaa" for i in range(1, 5))


def test_one_file_holds_the_latest_row_per_image(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    commit(out, R1, rows(R1, {"/a": ("1", "ok", False), "/b": ("1", "error", True)}))
    commit(out, R2, rows(R2, {"/b": ("1", "ok", False), "/c": ("1", "error", False)}))
    commit(out, R3, rows(R3, {"/a": ("1", "gone", False)}))
    index = ModelIndex.load(out, MODEL)
    assert index.covers == [R1, R2, R3] and len(index) == 3
    assert latest(out) == {"/a": ("1", "gone", R3), "/b": ("1", "ok", R2), "/c": ("1", "error", R2)}
    # Done: scored, or failed for good; not retryable failures, not images marked gone.
    assert done(out) == {key("/b", "1"), key("/c", "1")}
    # One file, rewritten by each run; the nights' parts are not read any more.
    assert [p.name for p in index_file(tmp_path).parent.iterdir()] == [INDEX_FILE]
    shutil.rmtree(tmp_path / "out" / "results")
    assert latest(out)["/b"] == ("1", "ok", R2)
    # What a night reads: 64-bit hashes and two small codes an image; the strings are only
    # read for images that are no longer listed.
    source = pq.ParquetFile(index_file(tmp_path))
    assert source.num_row_groups == 1  # not one per part or per night: whole row groups
    assert source.schema_arrow.names[:4] == ["uri_hash", "key_hash", "state", "run"]
    assert [f.type for f in source.schema_arrow][:4] == [pa.uint64(), pa.uint64(), pa.uint8(),
                                                         pa.int32()]  # fmt: skip
    listed = np.unique(hash_rows([pa.array(["/b"])]))
    assert index.missing(listed).column("image_uri").to_pylist() == ["/c"]  # /a is gone already
    assert index.missing(listed, "/c").column("image_uri").to_pylist() == ["/c"]
    assert index.missing(listed, "/elsewhere").num_rows == 0  # a run over another part


def test_runs_without_an_index_or_overlapping_are_folded_by_run_order(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    # Before indexes existed: no index at all, the parts are read.
    commit(out, R1, rows(R1, {"/a": ("1", "ok", False), "/b": ("1", "ok", False)}), index=False)
    assert latest(out) == {"/a": ("1", "ok", R1), "/b": ("1", "ok", R1)}
    # R2 started before R3 and commits after it: R3's index does not cover R2, and R2's (read
    # before R3 committed) does not cover R3. Folded by run id, R3's row for /a stays the
    # latest, whichever index was written last.
    r2_before = ModelIndex.load(out, MODEL)
    commit(out, R3, rows(R3, {"/a": ("2", "ok", False)}))
    writer = PartWriter(out, R2, rows_per_file=10)
    writer.write(rows(R2, {"/a": ("1", "error", True), "/c": ("1", "ok", False)}))
    files = writer.close()
    commit_run(out, R2, files, model_id=MODEL)
    want = {"/a": ("2", "ok", R3), "/b": ("1", "ok", R1), "/c": ("1", "ok", R2)}
    assert latest(out) == want  # R3's index, R2 folded from its parts
    r2_before.write(R2, files)
    assert ModelIndex.load(out, MODEL).covers == [R1, R2, R3]
    assert latest(out) == want  # R2's index, R3 folded from its parts


def test_a_retired_run_no_longer_counts_and_leaves_the_index(tmp_path: Path) -> None:
    """Removing a run's manifest retires it: its rows are not the latest any more (its images
    are scored again), and the next run's index drops them."""
    out = str(tmp_path / "out")
    commit(out, R1, rows(R1, {"/a": ("1", "ok", False), "/b": ("1", "ok", False)}))
    commit(out, R2, rows(R2, {"/b": ("2", "ok", False)}))
    (tmp_path / "out" / "_manifests" / f"run={R1}.json").unlink()
    assert latest(out) == {"/b": ("2", "ok", R2)}
    commit(out, R3, rows(R3, {"/c": ("1", "ok", False)}))
    metadata = json.loads(pq.ParquetFile(index_file(tmp_path)).schema_arrow.metadata[
        b"dskd_ray.run_index"])  # fmt: skip
    assert metadata["covers"] == [R2, R3] and metadata["runs"] == [R2, R3]
    assert pq.read_table(index_file(tmp_path))["image_uri"].to_pylist() == ["/b", "/c"]


def test_an_index_of_the_earlier_layout_is_read_once_then_replaced(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    commit(out, R1, rows(R1, {"/a": ("1", "ok", False), "/b": ("1", "error", True)}), False)
    folder = index_file(tmp_path).parent
    folder.mkdir(parents=True)
    table = read_parts(out, [{"path": p.relative_to(tmp_path / "out").as_posix()}
                             for p in (tmp_path / "out" / "results").rglob("*.parquet")], MODEL, R1)  # fmt: skip
    buffer = io.BytesIO()
    pq.write_table(table.select(INDEX_COLUMNS), buffer)
    (folder / f"run={R1}.parquet").write_bytes(buffer.getvalue())
    (folder / f"run={R1}.json").write_text(json.dumps({"covers": [R1]}))
    shutil.rmtree(tmp_path / "out" / "results")  # only the old index can say what R1 did
    assert latest(out) == {"/a": ("1", "ok", R1), "/b": ("1", "error", R1)}
    commit(out, R2, rows(R2, {"/c": ("1", "ok", False)}))
    assert [p.name for p in folder.iterdir()] == [INDEX_FILE]
    assert latest(out) == {"/a": ("1", "ok", R1), "/b": ("1", "error", R1), "/c": ("1", "ok", R2)}


def test_a_broken_index_and_other_models_are_ignored(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    commit(out, R1, rows(R1, {"/a": ("1", "ok", False)}))
    commit(
        out, R2, rows(R2, {"/a": ("1", "ok", False), "/x": ("1", "ok", False)}, "m2"), model="m2"
    )
    assert latest(out) == {"/a": ("1", "ok", R1)}
    assert latest(out, "m2") == {"/a": ("1", "ok", R2), "/x": ("1", "ok", R2)}
    # A damaged index: the committed runs are read instead.
    index_file(tmp_path).write_bytes(b"PAR1")
    assert latest(out) == {"/a": ("1", "ok", R1)}
    assert latest(str(tmp_path / "nothing-yet")) == {}
    # A damaged index and a damaged part of that run: its images count as not scored (they are
    # scored again), said in a warning, rather than a traceback before the night starts.
    [part] = (tmp_path / "out" / "results").glob(f"date=*/run={R1}/part-*.parquet")
    part.write_bytes(b"PAR1 no longer a Parquet file")
    assert latest(out) == {}


def test_a_gone_row_says_whether_the_image_was_ever_scored() -> None:
    from dskd_ray.nightly.results import GONE, GONE_UNSCORED, gone_rows

    state = rows(R1, {"/in/a": ("1", "ok", False), "/in/b": ("1", "error", False),
                      "/in/c": ("1", "ok", False)}).select(INDEX_COLUMNS)  # fmt: skip
    gone = gone_rows(state, pa.array(["/in/c"]), "/in", MODEL, R2).to_pydict()
    assert dict(zip(gone["image_uri"], gone["error"], strict=True)) == {
        "/in/a": GONE, "/in/b": GONE_UNSCORED,
    }  # fmt: skip
    assert "never scored" in GONE_UNSCORED and "since it was scored" in GONE
