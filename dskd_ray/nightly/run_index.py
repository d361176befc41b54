"""What a model has already scored, without reading every past run: one compact index per model.

    _index/model=<model id>/index.parquet   the model's latest row per image

One row per image: fixed-width columns first, `uri_hash` and `key_hash` (64-bit hashes of the
URI, and of the URI and version: what the nightly skip compares), `state` (scored, failed for
good, failed retryably, gone) and `run` (which run wrote the row: an index into the runs the
file's metadata names); then the URI and version as strings, read only for images that are no
longer listed (their "gone" rows) and when the file is rewritten. A night's skip reads the
fixed-width columns, 21 bytes an image, where the index of earlier versions (one file per run,
strings only) cost ~600 bytes of driver memory an image to read and diff.

Each run rewrites the file after its manifest, streaming it row group by row group, so the file
only ever holds committed rows, and it stays one file however many nights pass. The metadata
also names the committed runs the file covers; a reader folds in those it does not (runs that
overlapped, a run that died between its manifest and the index, outputs from before the index),
reading their parts. A run whose manifest was removed (retired) no longer counts: its rows are
dropped when the index is read, and from the file when it is next written. Files of the earlier
layout (`run=<id>.parquet` with `run=<id>.json`) are read as a base once, then removed. The
index is a cache of committed rows: if it is missing or unreadable, the runs are read instead.
No Ray here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dskd_ray.io.storage import (
    join_uri,
    list_folder,
    local_copy_to,
    read_object,
    reader_source,
    remove_object,
    storage_errors,
)
from dskd_ray.nightly.results import (
    MANIFEST_FORMAT,
    MANIFESTS_DIR,
    RESULT_SCHEMA,
    DamagedRunError,
    read_run_part,
)

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
INDEX_FILE = "index.parquet"
INDEX_FORMAT = "dskd_ray.run_index/2"
_METADATA_KEY = b"dskd_ray.run_index"
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
_STATUS = {OK: "ok", FAILED: "error", RETRY: "error", GONE: "gone"}


# --- hashes ------------------------------------------------------------------------------------


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


def _states(rows: pa.Table) -> np.ndarray:
    status = rows["status"].to_numpy(zero_copy_only=False)
    retry = pc.fill_null(rows["retryable"], True).to_numpy(zero_copy_only=False)
    state = np.full(len(status), RETRY, np.uint8)  # an unknown status is tried again
    state[status == "ok"] = OK
    state[(status == "error") & ~retry] = FAILED
    state[status == "gone"] = GONE
    return state


# --- runs and their rows -------------------------------------------------------------------------


def _model_dir(output: str, model_id: str) -> str:
    return join_uri(output, INDEX_DIR, f"model={model_id}")


def _run_ids(names: list[str], suffix: str) -> list[str]:
    ids = []
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base.startswith("run=") and base.endswith(suffix):
            ids.append(base[len("run=") : -len(suffix)])
    return sorted(ids)


def _listed(folder: str) -> list[str]:
    try:
        names, _ = list_folder(folder)
    except FileNotFoundError:
        return []
    return names


def committed_run_ids(output: str) -> list[str]:
    return _run_ids(_listed(join_uri(output, MANIFESTS_DIR)), ".json")


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
    tables = list(_iter_parts(output, files, model_id, run_id))
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def _iter_parts(output: str, files: list[dict], model_id: str, run_id: str):  # noqa: ANN202
    schema = pa.schema([*INDEX_SCHEMA, RESULT_SCHEMA.field("model_id")])
    for f in files:
        table = read_run_part(output, run_id, f["path"], schema)
        table = table.filter(pc.equal(table["model_id"], model_id))
        yield table.select(INDEX_COLUMNS).cast(INDEX_SCHEMA)


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


def _as_file_rows(rows: pa.Table, runs: list[str]) -> pa.Table:
    """INDEX_COLUMNS rows → FILE_SCHEMA rows, `run` numbered by its place in `runs`."""
    position = {r: i for i, r in enumerate(runs)}
    run = np.array([position[r] for r in pc.unique(rows["run_id"]).to_pylist()], np.int32)
    codes = pc.index_in(rows["run_id"], value_set=pc.unique(rows["run_id"]))
    return pa.table(
        {
            "uri_hash": hash_rows([rows["image_uri"]]),
            "key_hash": hash_rows([rows["image_uri"], rows["image_version"]]),
            "state": _states(rows),
            "run": run[codes.to_numpy(zero_copy_only=False)] if len(run) else np.zeros(0, np.int32),
            "image_uri": rows["image_uri"],
            "image_version": rows["image_version"],
        },
        schema=FILE_SCHEMA,
    )


# --- the index ---------------------------------------------------------------------------------


@dataclass
class _Base:
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
    def empty(cls) -> _Base:
        return cls(*(np.zeros(0, t) for t in (np.uint64, np.uint64, np.uint8, np.int32)), [], set())


@dataclass
class ModelIndex:
    """One model's latest row per image under an output, as of the committed runs read."""

    output: str
    model_id: str
    committed: list[str]  # the committed runs when it was read
    base: _Base
    keep: np.ndarray  # base rows still the latest (committed run, not overlaid)
    overlay: pa.Table  # INDEX_COLUMNS: the latest rows from committed runs the base does not cover
    legacy: list[str] = field(default_factory=list)  # files of the earlier layout, to remove

    @classmethod
    def load(cls, output: str, model_id: str) -> ModelIndex:
        """Read the index (its fixed-width columns) and fold in the committed runs it does not
        cover. A run whose manifest is gone does not count."""
        with storage_errors(output):
            committed = committed_run_ids(output)
            names = _listed(_model_dir(output, model_id))
            legacy = [n for n in names if n.rsplit("/", 1)[-1].startswith("run=")]
            base = _read_base(output, model_id, names, set(committed))
            alive = np.array([r in committed for r in base.runs], bool)  # retired runs: not
            keep = alive[base.run]
            uncovered = [r for r in committed if r not in base.covers]
            if uncovered:
                log.info("folding %d committed run(s) the index does not cover", len(uncovered))
            overlay = INDEX_SCHEMA.empty_table()
            for run_id in uncovered:
                rows = _run_rows(output, model_id, run_id)
                if rows is not None and rows.num_rows:
                    overlay = fold(overlay, rows)
        index = cls(output, model_id, committed, base, keep, overlay, legacy)
        index._overlay_supersedes()
        return index

    def _overlay_supersedes(self) -> None:
        """Per image, the later run's row wins between the base and the overlay."""
        if not self.overlay.num_rows:
            return
        o_hash = hash_rows([self.overlay["image_uri"]])
        order = np.argsort(o_hash)
        o_hash, o_run = o_hash[order], np.array(self.overlay["run_id"].to_pylist(), object)[order]
        hit = np.flatnonzero(self.keep & member(self.base.uri_hash, o_hash))
        drop_overlay = np.zeros(len(o_hash), bool)
        for i in hit:
            j = np.searchsorted(o_hash, self.base.uri_hash[i])
            if self.base.runs[self.base.run[i]] > o_run[j]:
                drop_overlay[j] = True
            else:
                self.keep[i] = False
        if drop_overlay.any():
            keep_overlay = np.ones(len(o_hash), bool)
            keep_overlay[order[drop_overlay]] = False
            self.overlay = self.overlay.filter(pa.array(keep_overlay))

    @property
    def covers(self) -> list[str]:
        """The committed runs this index has folded in."""
        return list(self.committed)

    def __len__(self) -> int:
        return int(self.keep.sum()) + self.overlay.num_rows

    def done_keys(self) -> np.ndarray:
        """Sorted key hashes (`hash_rows([uri, version])`) of the images whose latest row is
        final: scored, or failed for a reason another try would not change. Retryable failures
        are not done, nor are images marked gone (one that comes back is scored again)."""
        keys = self.base.key_hash[self.keep & (self.base.state <= FAILED)]
        over = self.overlay.filter(pa.array(_states(self.overlay) <= FAILED))
        if over.num_rows:
            keys = np.concatenate([keys, hash_rows([over["image_uri"], over["image_version"]])])
        keys.sort()  # in place: `np.unique` took five times the array's size (`member` needs
        return keys  # only sorted values, duplicates or not)

    def missing(self, listed_uri_hashes: np.ndarray, prefix: str | None = None) -> pa.Table:
        """INDEX_COLUMNS of the images under `prefix` whose latest row is not "gone" and whose
        URI is not in `listed_uri_hashes` (sorted): the candidates for tonight's "gone" rows.
        Their strings are read from the index file, row group by row group, only where one
        is missing, and only those under `prefix` are kept (a run over part of what the model
        scored elsewhere holds none of the rest)."""
        base = self.base
        wanted = self.keep & (base.state != GONE) & ~member(base.uri_hash, listed_uri_hashes)
        found = [self._base_rows(np.flatnonzero(wanted), prefix)]
        over = self.overlay.filter(pa.array(_states(self.overlay) != GONE))
        if over.num_rows:
            gone = ~member(hash_rows([over["image_uri"]]), listed_uri_hashes)
            found.append(_under(over.filter(pa.array(gone)), prefix))
        return pa.concat_tables(found)

    def rows(self) -> pa.Table:
        """INDEX_COLUMNS: every image's latest row (all strings read: for tests and checks)."""
        return pa.concat_tables([self._base_rows(np.flatnonzero(self.keep)), self.overlay])

    def _base_rows(self, positions: np.ndarray, prefix: str | None = None) -> pa.Table:
        """INDEX_COLUMNS of the base rows at `positions` (sorted), under `prefix` if given."""
        tables = [INDEX_SCHEMA.empty_table()]
        for at, strings in self._strings(positions):
            state = self.base.state[at]
            table = pa.table(
                {
                    "image_uri": strings["image_uri"],
                    "image_version": strings["image_version"],
                    "status": pa.array([_STATUS[s] for s in state], pa.string()),
                    "retryable": pa.array(state == RETRY),
                    "run_id": pa.array([self.base.runs[r] for r in self.base.run[at]], pa.string()),
                },
                schema=INDEX_SCHEMA,
            )
            tables.append(_under(table, prefix))
        return pa.concat_tables(tables)

    def _strings(self, positions: np.ndarray):  # noqa: ANN202 - yields (positions, table)
        """image_uri and image_version of the base rows at `positions` (sorted), a row group at
        a time."""
        columns = ["image_uri", "image_version"]
        if not len(positions):
            return
        if self.base.strings is not None:
            yield positions, self.base.strings.select(columns).take(pa.array(positions))
            return
        with reader_source(self.base.source) as f:
            source = pq.ParquetFile(f, pre_buffer=False)
            start = 0
            for group in range(source.num_row_groups):
                end = start + source.metadata.row_group(group).num_rows
                lo, hi = np.searchsorted(positions, [start, end])
                if hi > lo:
                    table = source.read_row_group(group, columns=columns, use_threads=False)
                    yield positions[lo:hi], table.take(pa.array(positions[lo:hi] - start))
                start = end

    # --- writing ----------------------------------------------------------------------------

    def write(self, run_id: str, files: list[dict]) -> None:
        """The index after committed run `run_id` (its part files `files`): written after its
        manifest, streamed row group by row group; the earlier layout's files removed."""
        with storage_errors(self.output):
            self._write(run_id, files)
            for name in self.legacy:  # an index of the earlier layout: read once, now folded
                with contextlib.suppress(OSError):
                    remove_object(name)

    def _write(self, run_id: str, files: list[dict]) -> None:
        base = self.base
        # This run's images (every part read once here, once more to write them).
        mine = [hash_rows([t["image_uri"]]) for t in self._parts(run_id, files)]
        mine = np.concatenate(mine) if mine else np.zeros(0, np.uint64)
        mine.sort()
        older = np.array([r < run_id for r in base.runs], bool)[base.run]
        base_mine = member(base.uri_hash, mine)
        base_keep = self.keep & ~(base_mine & older)
        # A run that overlapped this one and committed first keeps its rows for those images.
        newer = base.uri_hash[self.keep & base_mine & ~older]
        o_hash = hash_rows([self.overlay["image_uri"]])
        o_run = np.array(self.overlay["run_id"].to_pylist(), object)
        o_older = o_run < run_id if len(o_run) else np.zeros(0, bool)
        o_mine = member(o_hash, mine)
        overlay = self.overlay.filter(pa.array(~(o_mine & o_older)))
        newer = np.unique(np.concatenate([newer, o_hash[o_mine & ~o_older]]))

        used = np.flatnonzero(np.bincount(base.run[base_keep], minlength=len(base.runs)))
        runs = sorted({*(base.runs[i] for i in used),
                       *overlay["run_id"].to_pylist(), run_id})  # fmt: skip
        renumber = np.array([runs.index(r) if r in runs else -1 for r in base.runs], np.int32)
        committed = sorted({*self.committed, run_id})
        metadata = {"format": INDEX_FORMAT, "model_id": self.model_id, "runs": runs,
                    "covers": committed}  # fmt: skip
        schema = FILE_SCHEMA.with_metadata({_METADATA_KEY: json.dumps(metadata)})
        uri = join_uri(_model_dir(self.output, self.model_id), INDEX_FILE)
        with local_copy_to(uri) as path, _RowGroups(path, schema) as out:
            for table in self._base_tables(base_keep, renumber):
                out.write(table)
            out.write(_as_file_rows(overlay, runs))
            for rows in self._parts(run_id, files):
                rows = _as_file_rows(rows, runs)
                out.write(rows.filter(pa.array(~member(rows["uri_hash"].to_numpy(), newer))))

    def _parts(self, run_id: str, files: list[dict]):  # noqa: ANN202 - yields tables
        yield from _iter_parts(self.output, files, self.model_id, run_id)

    def _base_tables(self, keep: np.ndarray, renumber: np.ndarray):  # noqa: ANN202
        """The kept base rows, FILE_SCHEMA, a row group at a time."""
        base = self.base
        start = 0
        for strings in self._all_strings():
            end = start + strings.num_rows
            mask = keep[start:end]
            if mask.any():
                sl = slice(start, end)
                table = pa.table(
                    {
                        "uri_hash": base.uri_hash[sl], "key_hash": base.key_hash[sl],
                        "state": base.state[sl], "run": renumber[base.run[sl]],
                        "image_uri": strings["image_uri"],
                        "image_version": strings["image_version"],
                    },
                    schema=FILE_SCHEMA,
                )  # fmt: skip
                yield table.filter(pa.array(mask))
            start = end

    def _all_strings(self):  # noqa: ANN202 - yields tables
        columns = ["image_uri", "image_version"]
        if self.base.strings is not None:
            for batch in self.base.strings.select(columns).to_batches(ROW_GROUP):
                yield pa.Table.from_batches([batch])
            return
        if self.base.source is None:
            return
        with reader_source(self.base.source) as f:
            source = pq.ParquetFile(f, pre_buffer=False)
            for group in range(source.num_row_groups):
                yield source.read_row_group(group, columns=columns, use_threads=False)


class _RowGroups:
    """A Parquet writer that writes whole row groups of ROW_GROUP rows (the last one less),
    however small the tables it is given: the file does not splinter over nights."""

    def __init__(self, path: str, schema: pa.Schema) -> None:
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema, **_WRITE_OPTIONS)
        self.pending: list[pa.Table] = []
        self.rows = 0

    def __enter__(self) -> _RowGroups:
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


def _under(table: pa.Table, prefix: str | None) -> pa.Table:
    """The rows whose image is `prefix` or under it (all of them without a prefix)."""
    if prefix is None or not table.num_rows:
        return table
    uris = table["image_uri"]
    inside = pc.or_(pc.equal(uris, prefix), pc.starts_with(uris, prefix.rstrip("/") + "/"))
    return table.filter(inside)


def _read_base(output: str, model_id: str, names: list[str], committed: set[str]) -> _Base:
    """The model's index file; else the newest committed index of the earlier layout; else
    nothing (every committed run is then folded from its parts)."""
    folder = _model_dir(output, model_id)
    uri = join_uri(folder, INDEX_FILE)
    if any(n.rsplit("/", 1)[-1] == INDEX_FILE for n in names):
        try:
            return _read_index_file(uri)
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            log.warning("ignoring the index %s: %s", uri, e)
    indexed = set(_run_ids(names, ".parquet"))
    for run_id in sorted(committed & indexed, reverse=True):
        try:
            return _read_legacy(folder, run_id)
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            log.warning("ignoring the index of run %s: %s", run_id, e)
    return _Base.empty()


def _read_index_file(uri: str) -> _Base:
    """The fixed-width columns, a row group at a time into arrays made once: read whole, the
    reader's buffers cost ~300 bytes an image beside the 21 the arrays hold (measured at 5·10⁴
    images; 56 bytes at 5·10⁵, read by row group)."""
    with reader_source(uri) as f:
        source = pq.ParquetFile(f, pre_buffer=False)
        metadata = json.loads(source.schema_arrow.metadata[_METADATA_KEY])
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
    return _Base(
        *(arrays[c] for c in FIXED),
        runs=list(metadata["runs"]),
        covers=set(metadata["covers"]),
        source=uri,
    )


def _read_legacy(folder: str, run_id: str) -> _Base:
    """An index of the earlier layout (strings, one file per run), read whole, once."""
    base = join_uri(folder, f"run={run_id}")
    covers = set(json.loads(read_object(base + ".json"))["covers"])
    table = pq.read_table(io.BytesIO(read_object(base + ".parquet"))).cast(INDEX_SCHEMA)
    runs = sorted(set(table["run_id"].to_pylist()))
    rows = _as_file_rows(table, runs)
    return _Base(
        *(rows[c].to_numpy() for c in FIXED),
        runs=runs,
        covers=covers,
        strings=rows.select(["image_uri", "image_version"]),
    )
