"""The index file's format (`run_index` keeps one per model): its schema and metadata, the
state of an image's latest row, the 64-bit hashes the nightly skip compares, and reading and
writing the file whole row groups at a time. No Ray here.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dskd_ray.io.storage import (
    join_uri,
    read_object,
    reader_source,
)
from dskd_ray.nightly.results import (
    RESULT_SCHEMA,
)

INDEX_FORMAT = "dskd_ray.run_index/2"
METADATA_KEY = b"dskd_ray.run_index"
# The strings a run's rows give the index, and the latest row per image `rows()` returns.
INDEX_COLUMNS = ["image_uri", "image_version", "status", "retryable", "run_id"]
INDEX_SCHEMA = pa.schema([RESULT_SCHEMA.field(c) for c in INDEX_COLUMNS])
FILE_SCHEMA = pa.schema(
    [
        ("uri_hash", pa.uint64()),
        ("key_hash", pa.uint64()),
        ("state", pa.uint8()),
        ("run", pa.int32()),
        ("image_uri", pa.string()),
        ("image_version", pa.string()),
    ]
)
FIXED = ["uri_hash", "key_hash", "state", "run"]
ROW_GROUP = 65_536
# Hashes are random: stored plain (no dictionary, no compression, which cost time and gained
# nothing); the small codes and the strings compressed.
_WRITE_OPTIONS = {
    "compression": {c: "none" if c.endswith("_hash") else "zstd" for c in FILE_SCHEMA.names},
    "use_dictionary": ["state", "run", "image_version"],
}

# `state`: what the latest row says. Done (skipped by the next run): scored, or failed for a
# reason another try would not change. Gone: no longer under the input when last listed.
OK, FAILED, RETRY, GONE = 0, 1, 2, 3
STATUS_NAMES = {OK: "ok", FAILED: "error", RETRY: "error", GONE: "gone"}


def hash_rows(columns: list[pa.Array | pa.ChunkedArray], rows: int = 8192) -> np.ndarray:
    """A 64-bit hash of each row's strings joined by newlines: of a URI, or of URI and version.

    Stored in the index, so it never changes: the first 8 bytes of BLAKE2b, little-endian. The
    strings are made `rows` at a time (Python objects: a bounded few MB). For
    set membership over up to ~10⁸ keys a collision is a one-in-10¹¹ event per lookup; its cost
    would be one image skipped for one night, or one missing "gone" row.
    """
    n = len(columns[0])
    out = np.empty(n, np.uint64)
    for start in range(0, n, rows):
        parts = [c.slice(start, rows).to_pylist() for c in columns]
        out[start : start + len(parts[0])] = [
            int.from_bytes(hashlib.blake2b("\n".join(r).encode(), digest_size=8).digest(), "little")
            for r in zip(*parts, strict=True)
        ]
    return out


def member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values ∈ sorted_set, elementwise."""
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def states_of(rows: pa.Table) -> np.ndarray:
    status = rows["status"].to_numpy(zero_copy_only=False)
    retry = pc.fill_null(rows["retryable"], True).to_numpy(zero_copy_only=False)
    state = np.full(len(status), RETRY, np.uint8)  # an unknown status is tried again
    state[status == "ok"] = OK
    state[(status == "error") & ~retry] = FAILED
    state[status == "gone"] = GONE
    return state


def as_file_rows(rows: pa.Table, runs: list[str]) -> pa.Table:
    """INDEX_COLUMNS rows → FILE_SCHEMA rows, `run` numbered by its place in `runs`."""
    position = {r: i for i, r in enumerate(runs)}
    run = np.array([position[r] for r in pc.unique(rows["run_id"]).to_pylist()], np.int32)
    codes = pc.index_in(rows["run_id"], value_set=pc.unique(rows["run_id"]))
    return pa.table(
        {
            "uri_hash": hash_rows([rows["image_uri"]]),
            "key_hash": hash_rows([rows["image_uri"], rows["image_version"]]),
            "state": states_of(rows),
            "run": run[codes.to_numpy(zero_copy_only=False)] if len(run) else np.zeros(0, np.int32),
            "image_uri": rows["image_uri"],
            "image_version": rows["image_version"],
        },
        schema=FILE_SCHEMA,
    )


@dataclass
class IndexBase:
    """The rows an index file (or an index of the earlier layout) holds, fixed width."""

    uri_hash: np.ndarray  # uint64
    key_hash: np.ndarray  # uint64
    state: np.ndarray  # uint8
    run: np.ndarray  # int32, into `runs`
    runs: list[str]
    covers: set[str]
    source: str | None = None  # the index file, for the strings
    strings: pa.Table | None = None  # or the strings in memory (an index of the earlier layout)

    @classmethod
    def empty(cls) -> IndexBase:
        return cls(*(np.zeros(0, t) for t in (np.uint64, np.uint64, np.uint8, np.int32)), [], set())


class RowGroupWriter:
    """A Parquet writer that writes whole row groups of ROW_GROUP rows (the last one less),
    however small the tables it is given: the file does not splinter over nights."""

    def __init__(self, path: str, schema: pa.Schema) -> None:
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema, **_WRITE_OPTIONS)
        self.pending: list[pa.Table] = []
        self.rows = 0

    def __enter__(self) -> RowGroupWriter:
        return self

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table.cast(self.schema))
            self.rows += table.num_rows
        while self.rows >= ROW_GROUP:
            self._flush(ROW_GROUP)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self.pending)
        self.writer.write_table(table.slice(0, rows), row_group_size=rows)
        rest = table.slice(rows)
        self.pending, self.rows = ([rest] if rest.num_rows else []), rest.num_rows

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None and self.rows:
            self._flush(self.rows)
        self.writer.close()


def read_index_file(uri: str) -> IndexBase:
    """The fixed-width columns, a row group at a time into arrays made once: read whole, the
    reader's buffers cost ~300 bytes an image beside the 21 the arrays hold (measured at 5·10⁴
    images; 56 bytes at 5·10⁵, read by row group)."""
    with reader_source(uri) as f:
        source = pq.ParquetFile(f, pre_buffer=False)
        metadata = json.loads(source.schema_arrow.metadata[METADATA_KEY])
        if metadata.get("format") != INDEX_FORMAT:
            raise ValueError(f"not a {INDEX_FORMAT} index")
        n = source.metadata.num_rows
        arrays = {c: np.empty(n, FILE_SCHEMA.field(c).type.to_pandas_dtype()) for c in FIXED}
        start = 0
        for group in range(source.num_row_groups):
            part = source.read_row_group(group, columns=FIXED, use_threads=False)
            for c in FIXED:
                arrays[c][start : start + part.num_rows] = part[c].to_numpy()
            start += part.num_rows
    return IndexBase(
        *(arrays[c] for c in FIXED),
        runs=list(metadata["runs"]),
        covers=set(metadata["covers"]),
        source=uri,
    )


def read_legacy_index(folder: str, run_id: str) -> IndexBase:
    """An index of the earlier layout (strings, one file per run), read whole, once."""
    base = join_uri(folder, f"run={run_id}")
    covers = set(json.loads(read_object(base + ".json"))["covers"])
    table = pq.read_table(io.BytesIO(read_object(base + ".parquet"))).cast(INDEX_SCHEMA)
    runs = sorted(set(table["run_id"].to_pylist()))
    rows = as_file_rows(table, runs)
    return IndexBase(
        *(rows[c].to_numpy() for c in FIXED),
        runs=runs,
        covers=covers,
        strings=rows.select(["image_uri", "image_version"]),
    )
