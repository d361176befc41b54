"""The per-model index of what is scored: folds, overlapping runs, and no reading of history."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa

from dskd_ray.results import RESULT_SCHEMA, PartWriter, commit_run, done_keys
from dskd_ray.run_index import INDEX_COLUMNS, INDEX_DIR, fold, latest_state, read_parts, write_index

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
    """A run as `score_images` commits it: parts, then its index, then the manifest."""
    writer = PartWriter(out, run_id, rows_per_file=2)
    writer.write(table)
    files = writer.close()
    if index:
        state, covers = latest_state(out, model)

        write_index(out, model, run_id, fold(state, read_parts(out, files, model, run_id)), covers)
    commit_run(out, run_id, files, model_id=model)


def as_dict(state: pa.Table) -> dict[str, tuple[str, str, str]]:
    return {
        r["image_uri"]: (r["image_version"], r["status"], r["run_id"]) for r in state.to_pylist()
    }


R1, R2, R3, R4 = (f"20260101T00000{i}Z-aaaaaa" for i in range(1, 5))


def test_the_newest_index_is_enough_once_written(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    commit(out, R1, rows(R1, {"/a": ("1", "ok", False), "/b": ("1", "error", True)}))
    commit(out, R2, rows(R2, {"/b": ("1", "ok", False), "/c": ("1", "error", False)}))
    commit(out, R3, rows(R3, {"/a": ("1", "gone", False)}))
    state, covers = latest_state(out, MODEL)
    assert covers == [R1, R2, R3]
    assert as_dict(state) == {
        "/a": ("1", "gone", R3),
        "/b": ("1", "ok", R2),
        "/c": ("1", "error", R2),
    }
    # Done: scored, or failed for good; not retryable failures, not images marked gone.
    assert sorted(done_keys(state).to_pylist()) == ["/b\n1", "/c\n1"]
    # The older nights' parts are not read any more: the newest index holds their rows.
    shutil.rmtree(tmp_path / "out" / "results" / "date=2026-01-01" / f"run={R1}")
    shutil.rmtree(tmp_path / "out" / "results" / "date=2026-01-01" / f"run={R2}")
    assert as_dict(latest_state(out, MODEL)[0]) == as_dict(state)


def test_runs_without_an_index_or_overlapping_are_folded_by_run_order(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    # Before indexes existed: no index at all, the parts are read.
    commit(out, R1, rows(R1, {"/a": ("1", "ok", False), "/b": ("1", "ok", False)}), index=False)
    assert as_dict(latest_state(out, MODEL)[0]) == {"/a": ("1", "ok", R1), "/b": ("1", "ok", R1)}
    # R3 commits an index; R2 started earlier and commits after it, with an index that does
    # not cover R3. Folded by run id, R3's row for /a stays the latest whatever the order.
    commit(out, R3, rows(R3, {"/a": ("2", "ok", False)}))
    writer = PartWriter(out, R2, rows_per_file=10)
    writer.write(rows(R2, {"/a": ("1", "error", True), "/c": ("1", "ok", False)}))
    files = writer.close()
    write_index(out, MODEL, R2, read_parts(out, files, MODEL, R2), [R1])
    commit_run(out, R2, files, model_id=MODEL)
    state, covers = latest_state(out, MODEL)
    assert covers == [R1, R2, R3]
    assert as_dict(state) == {
        "/a": ("2", "ok", R3), "/b": ("1", "ok", R1), "/c": ("1", "ok", R2),
    }  # fmt: skip


def test_an_uncommitted_or_broken_index_and_other_models_are_ignored(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    commit(out, R1, rows(R1, {"/a": ("1", "ok", False)}))
    commit(
        out, R2, rows(R2, {"/a": ("1", "ok", False), "/x": ("1", "ok", False)}, "m2"), model="m2"
    )
    # A run that died after its index and before its manifest: its index must not count.
    write_index(out, MODEL, R4, rows(R4, {"/z": ("1", "ok", False)}).select(
        ["image_uri", "image_version", "status", "retryable", "run_id"]), [R1])  # fmt: skip
    assert as_dict(latest_state(out, MODEL)[0]) == {"/a": ("1", "ok", R1)}
    # A damaged index: the committed runs are read instead.
    (tmp_path / "out" / INDEX_DIR / f"model={MODEL}" / f"run={R1}.parquet").write_bytes(b"PAR1")
    assert as_dict(latest_state(out, MODEL)[0]) == {"/a": ("1", "ok", R1)}
    assert as_dict(latest_state(str(tmp_path / "nothing-yet"), MODEL)[0]) == {}
    # A damaged index and a damaged part of that run: its images count as not scored (they are
    # scored again), said in a warning, rather than a traceback before the night starts.
    [part] = (tmp_path / "out" / "results").glob(f"date=*/run={R1}/part-*.parquet")
    part.write_bytes(b"PAR1 no longer a Parquet file")
    assert as_dict(latest_state(out, MODEL)[0]) == {}


def test_a_gone_row_says_whether_the_image_was_ever_scored() -> None:
    from dskd_ray.results import GONE, GONE_UNSCORED, gone_rows

    latest = rows(R1, {"/in/a": ("1", "ok", False), "/in/b": ("1", "error", False),
                       "/in/c": ("1", "ok", False)}).select(INDEX_COLUMNS)  # fmt: skip
    gone = gone_rows(latest, pa.array(["/in/c"]), "/in", MODEL, R2).to_pydict()
    assert dict(zip(gone["image_uri"], gone["error"], strict=True)) == {
        "/in/a": GONE, "/in/b": GONE_UNSCORED,
    }  # fmt: skip
    assert "never scored" in GONE_UNSCORED and "since it was scored" in GONE
