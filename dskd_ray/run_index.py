"""What a model has already scored, without reading every past run: a compact index per run.

    _index/model=<model id>/run=<run id>.parquet   the model's latest row per image after that run
    _index/model=<model id>/run=<run id>.json      the committed runs it was folded from

A run reads the newest index whose run is committed and folds in the few committed runs it does
not cover (runs that overlapped it, runs of other models, runs from before indexes existed);
at commit it writes its own index. So the nightly skip reads one file the size of the
collection, not one file per past night: the driver's memory stays flat as nights accumulate.
An index is a cache of committed rows: if one is missing or unreadable the runs are read
instead. No Ray here.
"""

from __future__ import annotations

import io
import json
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dskd_ray.results import (
    MANIFEST_FORMAT,
    MANIFESTS_DIR,
    RESULT_SCHEMA,
    DamagedRunError,
    read_run_part,
)
from dskd_ray.storage import join_uri, list_folder, read_object, storage_errors, write_object

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
INDEX_COLUMNS = ["image_uri", "image_version", "status", "retryable", "run_id"]
INDEX_SCHEMA = pa.schema([RESULT_SCHEMA.field(c) for c in INDEX_COLUMNS])


def empty_state() -> pa.Table:
    return INDEX_SCHEMA.empty_table()


def _model_dir(output: str, model_id: str) -> str:
    return join_uri(output, INDEX_DIR, f"model={model_id}")


def _run_ids(names: list[str], suffix: str) -> list[str]:
    ids = []
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base.startswith("run=") and base.endswith(suffix):
            ids.append(base[len("run=") : -len(suffix)])
    return sorted(ids)


def _listed_ids(folder: str, suffix: str) -> list[str]:
    try:
        names, _ = list_folder(folder)
    except FileNotFoundError:
        return []
    return _run_ids(names, suffix)


def latest_state(output: str, model_id: str) -> tuple[pa.Table, list[str]]:
    """(this model's latest row per image with INDEX_COLUMNS, the committed run ids folded in).

    Gone rows are kept: a later run must see that an image was marked gone.
    """
    with storage_errors(output):
        committed = _listed_ids(join_uri(output, MANIFESTS_DIR), ".json")
        indexed = set(_listed_ids(_model_dir(output, model_id), ".parquet"))
        state, covered = empty_state(), set()
        for run_id in reversed(committed):  # the newest committed run that left an index
            if run_id in indexed:
                try:
                    state, covered = _read_index(output, model_id, run_id)
                    break
                except (OSError, ValueError, pa.ArrowException) as e:
                    log.warning("ignoring the index of run %s: %s", run_id, e)
        uncovered = [r for r in committed if r not in covered]
        if uncovered:
            log.info("folding %d committed run(s) the index does not cover", len(uncovered))
        for run_id in uncovered:
            rows = _run_rows(output, model_id, run_id)
            if rows is not None and rows.num_rows:
                state = fold(state, rows)
        return state, sorted(covered | set(uncovered))


def _read_index(output: str, model_id: str, run_id: str) -> tuple[pa.Table, set[str]]:
    base = join_uri(_model_dir(output, model_id), f"run={run_id}")
    covers = set(json.loads(read_object(base + ".json"))["covers"])
    table = pq.read_table(io.BytesIO(read_object(base + ".parquet"))).cast(INDEX_SCHEMA)
    return table, covers


def _run_rows(output: str, model_id: str, run_id: str) -> pa.Table | None:
    """This model's rows of one committed run, or None if the run is another model's."""
    try:
        manifest = json.loads(read_object(join_uri(output, MANIFESTS_DIR, f"run={run_id}.json")))
    except (ValueError, OSError) as e:
        log.warning("ignoring unreadable manifest of run %s: %s", run_id, e)
        return None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("model_id") not in (
        None,
        model_id,
    ):
        return None
    try:
        return read_parts(output, manifest.get("files", []), model_id, run_id)
    except DamagedRunError as e:  # its images are scored again: better than no night at all
        log.warning("%s; scoring its images as if it had not run", e)
        return None


def read_parts(output: str, files: list[dict], model_id: str, run_id: str) -> pa.Table:
    """INDEX_COLUMNS of `model_id`'s rows in run `run_id`'s part files (manifest entries)."""
    schema = pa.schema([*INDEX_SCHEMA, RESULT_SCHEMA.field("model_id")])
    tables = []
    for f in files:
        table = read_run_part(output, run_id, f["path"], schema)
        table = table.filter(pc.equal(table["model_id"], model_id))
        tables.append(table.select(INDEX_COLUMNS).cast(INDEX_SCHEMA))
    return pa.concat_tables(tables) if tables else empty_state()


def fold(state: pa.Table, rows: pa.Table) -> pa.Table:
    """`state` updated with `rows` (one run's rows, one per image): per image, the row of the
    later run wins, whichever table it is in (runs that overlapped fold in any order)."""
    if not rows.num_rows:
        return state
    run_id = rows["run_id"][0].as_py()
    newer = state.filter(pc.greater(state["run_id"], run_id))
    rows = rows.filter(pc.invert(pc.is_in(rows["image_uri"], value_set=newer["image_uri"])))
    kept = state.filter(pc.invert(pc.is_in(state["image_uri"], value_set=rows["image_uri"])))
    return pa.concat_tables([kept, rows.select(INDEX_COLUMNS).cast(INDEX_SCHEMA)])


def write_index(
    output: str, model_id: str, run_id: str, state: pa.Table, covers: list[str]
) -> None:
    """Write run `run_id`'s index (before its manifest: an index whose run never committed is
    ignored, a committed run always has its index)."""
    base = join_uri(_model_dir(output, model_id), f"run={run_id}")
    buffer = io.BytesIO()
    pq.write_table(state, buffer, compression="zstd")
    write_object(base + ".parquet", buffer.getvalue())
    write_object(
        base + ".json", (json.dumps({"covers": sorted({*covers, run_id})}) + "\n").encode()
    )
