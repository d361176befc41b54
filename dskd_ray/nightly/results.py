"""Scoring results on storage: the row schema, the run layout, the commit manifest, the reader.

Layout under an output root (local folder or s3:// prefix):

    results/date=YYYY-MM-DD/run=<run_id>/part-00000.parquet   one row per image scored in a run
    maps/model=<model_id>/<image path>.<hash>.png            one 16-bit anomaly map per scored image
    _manifests/run=<run_id>.json                             the commit marker, written last

A run is visible only once its manifest exists: `read_results` reads the part files the
manifests name and nothing else, so a run that died (parts, maps, no manifest) is invisible and
the next run scores its images again. Each run writes only under its own run id, so two runs on
one output never touch each other's files. No Ray here.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dskd_ray.errors import DataError
from dskd_ray.io.storage import (
    exists,
    join_uri,
    list_folder,
    read_object,
    storage_errors,
    write_object,
)

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "dskd_ray.scoring_run/1"
RESULTS_DIR = "results"
MAPS_DIR = "maps"
MANIFESTS_DIR = "_manifests"

RESULT_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("image_version", pa.string()),  # ETag, or size + mtime on local disk
        ("image_bytes", pa.int64()),
        ("width", pa.int32()),  # of the original image; null when it could not be decoded
        ("height", pa.int32()),
        ("score", pa.float32()),  # max of the anomaly map
        ("threshold", pa.float64()),  # from the checkpoint; null if it has none
        ("is_anomalous", pa.bool_()),
        ("map_uri", pa.string()),  # 16-bit greyscale PNG (map_width × map_height)
        ("map_scale", pa.float64()),  # float map = PNG value × map_scale
        # The stored map's size: the model's input; for a tiled model the image's own, max-pooled
        # to at most tiling.MAP_MAX_SIDE a side. Null in parts written before tiling.
        ("map_width", pa.int32()),
        ("map_height", pa.int32()),
        ("model_id", pa.string()),
        # Which route of a night with several models the image is in (`dskd score --models`,
        # `--routes`); null for a run of one --model, and in parts written before routes.
        ("route", pa.string()),
        ("run_id", pa.string()),
        ("scored_at", pa.timestamp("ms", tz="UTC")),
        ("status", pa.string()),  # "ok" | "error" | "gone" (no longer under the input)
        ("error", pa.string()),  # why, when status is "error"
        ("retryable", pa.bool_()),  # a read/write/system failure: the next run tries again
    ]
)


def new_run_id(now: float | None = None) -> str:
    """Sortable by start time, unique across concurrent runs: 20260131T020000Z-3f9a1c."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{stamp}-{secrets.token_hex(3)}"


def run_partition(run_id: str) -> str:
    """results/date=YYYY-MM-DD/run=<run_id>, relative to the output root."""
    day = datetime.strptime(run_id[:8], "%Y%m%d").strftime("%Y-%m-%d")
    return f"{RESULTS_DIR}/date={day}/run={run_id}"


def manifest_path(run_id: str) -> str:
    return f"{MANIFESTS_DIR}/run={run_id}.json"


class PartWriter:
    """Collects a run's rows and writes them as Parquet parts under the run's partition.

    Each part is written whole (one PUT or a rename), `rows_per_file` rows at most. With
    `model_ids`, each part's entry names the models whose rows it holds (a run of several
    models: a model's index then reads only its parts).
    """

    def __init__(
        self, output: str, run_id: str, rows_per_file: int = 100_000, model_ids: bool = False
    ) -> None:
        self.output = output
        self.model_ids = model_ids
        self.partition = run_partition(run_id)
        self.rows_per_file = max(1, rows_per_file)
        self.files: list[dict[str, Any]] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._scores: list[np.ndarray] = []

    def write(self, table: pa.Table) -> None:
        self._pending.append(table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA))
        self._pending_rows += table.num_rows
        ok = table.filter(pc.equal(table["status"], "ok"))["score"]
        self._scores.append(ok.to_numpy(zero_copy_only=False).astype(np.float32))
        while self._pending_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def scores(self) -> np.ndarray:
        """The scores of the "ok" rows written so far: the run's distribution, for its drift."""
        return np.concatenate(self._scores) if self._scores else np.zeros(0, np.float32)

    def close(self) -> list[dict[str, Any]]:
        while self._pending_rows:
            self._flush(min(self._pending_rows, self.rows_per_file))
        return self.files

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        part, rest = table.slice(0, rows), table.slice(rows)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        relative = f"{self.partition}/part-{len(self.files):05d}.parquet"
        buffer = io.BytesIO()
        pq.write_table(part, buffer, compression="zstd")
        write_object(join_uri(self.output, relative), buffer.getvalue())
        entry: dict[str, Any] = {"path": relative, "rows": part.num_rows}
        if self.model_ids:
            entry["model_ids"] = sorted(pc.unique(part["model_id"]).drop_null().to_pylist())
        self.files.append(entry)


def commit_run(output: str, run_id: str, files: list[dict[str, Any]], **fields: Any) -> str:
    """Write the run's manifest, the last thing a run writes: from now on readers see it."""
    manifest = {"format": MANIFEST_FORMAT, "run_id": run_id, "files": files, **fields}
    uri = join_uri(output, manifest_path(run_id))
    write_object(uri, (json.dumps(manifest, indent=2, default=str) + "\n").encode())
    return uri


@dataclass
class CommittedRun:
    run_id: str
    manifest: dict[str, Any] = field(repr=False)

    @property
    def model_id(self) -> str | None:
        """The run's model; None for a run of several models (`model_ids`)."""
        return self.manifest.get("model_id")

    @property
    def model_ids(self) -> list[str] | None:
        """Every model whose rows the run holds; None when the manifest does not say."""
        ids = self.manifest.get("model_ids")
        if isinstance(ids, list):
            return [str(i) for i in ids]
        return [self.model_id] if self.model_id else None

    def holds(self, model_id: str) -> bool:
        """The run may hold rows of `model_id`."""
        ids = self.model_ids
        return ids is None or model_id in ids

    @property
    def files(self) -> list[str]:
        return [f["path"] for f in self.manifest.get("files", [])]

    def files_of(self, model_id: str | None) -> list[str]:
        """The parts that may hold `model_id`'s rows (all, for None or a part that does not say)."""
        return [
            f["path"]
            for f in self.manifest.get("files", [])
            if model_id is None or not isinstance(f.get("model_ids"), list)
            or model_id in f["model_ids"]
        ]  # fmt: skip


@dataclass
class DamagedManifest:
    """A file in `_manifests/` named like a run's manifest that is not a readable one (cut
    short, edited, another run's). Its run is not committed: its rows are not read, and the
    next scoring run scores its images again (docs/design.md §6)."""

    run_id: str
    path: str
    why: str

    def __str__(self) -> str:
        return (
            f"run {self.run_id} is damaged: its manifest {self.path} {self.why}; its rows are "
            "not read, and the next `dskd score` scores its images again"
        )


def committed_runs(output: str) -> list[CommittedRun]:
    """The runs whose manifest exists and reads as one, oldest first (a damaged one is logged:
    `scan_runs` has them)."""
    committed, damaged = scan_runs(output)
    for d in damaged:
        log.warning("%s", d)
    return committed


def scan_runs(output: str) -> tuple[list[CommittedRun], list[DamagedManifest]]:
    """Every manifest under `output`, read: the committed runs and the damaged manifests, each
    oldest first. Read in parallel: a night reads them all, and on object storage each is a
    request."""
    with storage_errors(output):
        return _scan_runs(output)


MANIFEST_READERS = 16  # manifests read at once


def _scan_runs(output: str) -> tuple[list[CommittedRun], list[DamagedManifest]]:
    try:
        names, _ = list_folder(join_uri(output, MANIFESTS_DIR))
    except FileNotFoundError:
        return [], []
    wanted = []
    for path in names:
        base = path.rsplit("/", 1)[-1]
        if base.startswith("run=") and base.endswith(".json"):
            wanted.append((path, base[len("run=") : -len(".json")]))
        # else: a temp file of a manifest being written, or a stranger
    if not wanted:
        return [], []
    with ThreadPoolExecutor(min(MANIFEST_READERS, len(wanted))) as pool:
        found = list(pool.map(lambda w: _read_manifest(*w), wanted))
    committed = [r for r in found if isinstance(r, CommittedRun)]
    damaged = [r for r in found if isinstance(r, DamagedManifest)]
    return (
        sorted(committed, key=lambda r: r.run_id),
        sorted(damaged, key=lambda r: r.run_id),
    )


def _read_manifest(path: str, run_id: str) -> CommittedRun | DamagedManifest | None:
    try:
        blob = read_object(path)
    except FileNotFoundError:
        return None  # retired between the listing and the read
    try:
        manifest = json.loads(blob)
    except ValueError:  # cut short, or not text at all
        return DamagedManifest(run_id, path, f"is not valid JSON ({len(blob)} bytes)")
    problem = _manifest_problem(manifest, run_id)
    if problem is not None:
        return DamagedManifest(run_id, path, problem)
    return CommittedRun(run_id, manifest)


def _manifest_problem(manifest: Any, run_id: str) -> str | None:
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"is not a {MANIFEST_FORMAT} manifest (format {manifest.get('format')!r})"
    if manifest.get("run_id") != run_id:
        return f"names another run ({manifest.get('run_id')!r})"
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("path"), str) for f in files
    ):
        return "does not list its part files"
    return None


def read_results(
    output: str,
    model_id: str | None = None,
    columns: list[str] | None = None,
    latest: bool = False,
    missing_ok: bool = False,
    route: str | None = None,
) -> pa.Table:
    """All rows of committed runs under `output` (RESULT_SCHEMA), oldest run first.

    model_id keeps one model's rows, route one route's (of runs with several models: `dskd
    score --models`, `--routes`), whichever models scored it over the nights. latest=True keeps one row per (image_uri, model_id), the
    most recent run's: the image's current state (a changed image, a --rescore, or two runs that
    overlapped each write a second row). An image deleted from the input since it was scored
    has, as its latest row, one with status "gone", written by the model's next run.
    Uncommitted runs, killed or still going, are never read. An `output` that does not exist
    raises DataError (a mistyped path must not read as "no results"), unless `missing_ok`.
    Storage that cannot be reached raises StorageError.
    """
    with storage_errors(output):
        return _read_results(output, model_id, columns, latest, missing_ok, route)


def _read_results(
    output: str,
    model_id: str | None,
    columns: list[str] | None,
    latest: bool,
    missing_ok: bool,
    route: str | None = None,
) -> pa.Table:
    wanted = list(columns) if columns else list(RESULT_SCHEMA.names)
    extra = ["model_id"] if model_id is not None else []
    extra += ["route"] if route is not None else []
    if latest:
        extra += ["image_uri", "model_id", "run_id"]
    read_cols = list(dict.fromkeys(wanted + extra))
    schema = pa.schema([RESULT_SCHEMA.field(c) for c in read_cols])
    if not missing_ok and not exists(output):
        raise DataError(f"{output} does not exist: no scoring run has written there")
    tables = []
    for run in committed_runs(output):
        if model_id is not None and not run.holds(model_id):
            continue
        parts = run.files_of(model_id)
        tables += [read_run_part(output, run.run_id, relative, schema) for relative in parts]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if model_id is not None:
        table = table.filter(pc.equal(table["model_id"], model_id))
    if route is not None:
        table = table.filter(pc.equal(table["route"], route))
    if latest and table.num_rows:
        table = _latest_per_image(table)
    return table.select(wanted)


class DamagedRunError(DataError):
    """A committed run's part file is missing or cannot be read as Parquet."""

    def __init__(self, run_id: str, part: str, cause: str) -> None:
        super().__init__(f"run {run_id} is damaged: its result part {part} {cause}")
        self.run_id, self.part, self.cause = run_id, part, cause


def read_run_part(output: str, run_id: str, relative: str, schema: pa.Schema) -> pa.Table:
    """`read_part` of one part file a committed run's manifest names; DamagedRunError naming the
    file when it is missing or is not readable Parquet (truncated, overwritten, bit rot)."""
    uri = join_uri(output, relative)
    try:
        data = read_object(uri)
    except FileNotFoundError:
        raise DamagedRunError(run_id, uri, "is missing") from None
    try:
        return read_part(data, schema)
    except (pa.ArrowException, OSError, ValueError) as e:
        why = " ".join(str(e).split())
        raise DamagedRunError(run_id, uri, f"cannot be read as Parquet ({why})") from e


def read_part(data: bytes, schema: pa.Schema) -> pa.Table:
    """The columns of `schema` from one part file's bytes; a column that parts written by an
    older version lack reads as nulls."""
    part = pq.ParquetFile(io.BytesIO(data))
    present = set(part.schema_arrow.names)
    table = part.read(columns=[c for c in schema.names if c in present])
    for column in schema:
        if column.name not in present:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table.select(schema.names).cast(schema)


def _latest_per_image(table: pa.Table) -> pa.Table:
    keys = ["image_uri", "model_id"]
    table = table.sort_by([("run_id", "ascending")])
    indexed = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    last = indexed.group_by(keys, use_threads=False).aggregate([("_row", "max")])
    rows = last["_row_max"]
    return table.take(rows.take(pc.sort_indices(rows)))  # in run order, as read_results promises


def gone_rows(
    latest: pa.Table, listed: pa.Array, prefix: str, model_id: str, run_id: str
) -> pa.Table:
    """Rows saying "gone" for images under `prefix` whose latest row is not yet "gone" and that
    the listing no longer finds (deleted or moved): the latest view then says so."""
    under = pc.or_(
        pc.equal(latest["image_uri"], prefix),
        pc.starts_with(latest["image_uri"], prefix.rstrip("/") + "/"),
    )
    missing = pc.invert(pc.is_in(latest["image_uri"], value_set=listed))
    keep = pc.and_(pc.and_(under, missing), pc.not_equal(latest["status"], "gone"))
    rows = latest.filter(keep)
    n = rows.num_rows
    columns = {name: pa.nulls(n, RESULT_SCHEMA.field(name).type) for name in RESULT_SCHEMA.names}
    columns |= {
        "image_uri": rows["image_uri"].combine_chunks(),
        "image_version": rows["image_version"].combine_chunks(),
        "model_id": pa.array([model_id] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "scored_at": pa.array([utc_now()] * n, RESULT_SCHEMA.field("scored_at").type),
        "status": pa.array(["gone"] * n, pa.string()),
        # What the image was before it went: scored, or only ever an error row.
        "error": pc.if_else(pc.equal(rows["status"], "ok"), GONE, GONE_UNSCORED),
        "retryable": pa.array([False] * n, pa.bool_()),
    }
    return pa.table(columns, schema=RESULT_SCHEMA)


GONE = "no longer under the input (deleted or moved since it was scored)"
GONE_UNSCORED = (
    "no longer under the input (deleted or moved since an earlier run listed it; never scored)"
)


def utc_now() -> datetime:
    return datetime.now(UTC)
