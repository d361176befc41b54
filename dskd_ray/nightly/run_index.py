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
The file's format: `index_file`. No Ray here.
"""

from __future__ import annotations

import contextlib
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
    reader_source,
    remove_object,
    storage_errors,
)
from dskd_ray.nightly.index_file import (
    FAILED,
    FILE_SCHEMA,
    GONE,
    INDEX_COLUMNS,
    INDEX_FORMAT,
    INDEX_SCHEMA,
    METADATA_KEY,
    RETRY,
    ROW_GROUP,
    STATUS_NAMES,
    IndexBase,
    RowGroupWriter,
    as_file_rows,
    hash_rows,
    member,
    read_index_file,
    read_legacy_index,
    states_of,
)
from dskd_ray.nightly.results import (
    RESULT_SCHEMA,
    CommittedRun,
    DamagedRunError,
    committed_runs,
    read_run_part,
)

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
INDEX_FILE = "index.parquet"


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


def _run_rows(output: str, model_id: str, run: CommittedRun) -> pa.Table | None:
    """This model's rows of one committed run, or None if the run is another model's."""
    if not run.holds(model_id):
        return None
    try:
        return read_parts(output, run.manifest["files"], model_id, run.run_id)
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
        if isinstance(f.get("model_ids"), list) and model_id not in f["model_ids"]:
            continue  # a part of a run of several models that holds none of this model's rows
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


# --- the index ---------------------------------------------------------------------------------


@dataclass
class ModelIndex:
    """One model's latest row per image under an output, as of the committed runs read."""

    output: str
    model_id: str
    committed: list[str]  # the committed runs when it was read
    base: IndexBase
    keep: np.ndarray  # base rows still the latest (committed run, not overlaid)
    overlay: pa.Table  # INDEX_COLUMNS: the latest rows from committed runs the base does not cover
    legacy: list[str] = field(default_factory=list)  # files of the earlier layout, to remove

    @classmethod
    def load(cls, output: str, model_id: str) -> ModelIndex:
        """Read the index (its fixed-width columns) and fold in the committed runs it does not
        cover. A run whose manifest is gone does not count."""
        with storage_errors(output):
            # Read, not only listed: a run whose manifest is damaged is not committed, so its
            # rows do not count and its images are scored again (they used to be skipped).
            runs = {run.run_id: run for run in committed_runs(output)}
            committed = sorted(runs)
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
                rows = _run_rows(output, model_id, runs[run_id])
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
        over = self.overlay.filter(pa.array(states_of(self.overlay) <= FAILED))
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
        over = self.overlay.filter(pa.array(states_of(self.overlay) != GONE))
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
                    "status": pa.array([STATUS_NAMES[s] for s in state], pa.string()),
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
        schema = FILE_SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata)})
        uri = join_uri(_model_dir(self.output, self.model_id), INDEX_FILE)
        with local_copy_to(uri) as path, RowGroupWriter(path, schema) as out:
            for table in self._base_tables(base_keep, renumber):
                out.write(table)
            out.write(as_file_rows(overlay, runs))
            for rows in self._parts(run_id, files):
                rows = as_file_rows(rows, runs)
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


def _under(table: pa.Table, prefix: str | None) -> pa.Table:
    """The rows whose image is `prefix` or under it (all of them without a prefix)."""
    if prefix is None or not table.num_rows:
        return table
    uris = table["image_uri"]
    inside = pc.or_(pc.equal(uris, prefix), pc.starts_with(uris, prefix.rstrip("/") + "/"))
    return table.filter(inside)


def _read_base(output: str, model_id: str, names: list[str], committed: set[str]) -> IndexBase:
    """The model's index file; else the newest committed index of the earlier layout; else
    nothing (every committed run is then folded from its parts)."""
    folder = _model_dir(output, model_id)
    uri = join_uri(folder, INDEX_FILE)
    if any(n.rsplit("/", 1)[-1] == INDEX_FILE for n in names):
        try:
            return read_index_file(uri)
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            log.warning("ignoring the index %s: %s", uri, e)
    indexed = set(_run_ids(names, ".parquet"))
    for run_id in sorted(committed & indexed, reverse=True):
        try:
            return read_legacy_index(folder, run_id)
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            log.warning("ignoring the index of run %s: %s", run_id, e)
    return IndexBase.empty()
