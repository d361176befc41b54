"""Bulk scoring on Ray Data: images under a prefix in, anomaly maps and Parquet rows out.

    list (driver: URIs and versions, never image bytes) → skip what this model already scored
      → read + decode + resize   CPU tasks, `decode_image` as everywhere else (in a child
                                 process: an image that crashes it is one error row)
      → score                    an actor pool; each actor loads the model once (`Scorer`)
      → write maps (16-bit PNG)  CPU tasks
      → Parquet parts → manifest (driver; the manifest is the commit, written last)

Every listed image leaves exactly one row: a file that cannot be read or decoded becomes a row
with status "error" and the reason, never a failed job. The model code stays Ray-free: the actor
only wraps `Scorer`. Layout and commit rules: `dskd_ray.nightly.results`.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dskd_ray.config import ScoringOptions
from dskd_ray.errors import CheckpointError, ConfigError, DataError, DSKDError
from dskd_ray.inference import tiling
from dskd_ray.io.decoder_process import DecoderCrashed, shared_decoder
from dskd_ray.io.images import ImageDecodeError
from dskd_ray.io.map_png import encode_map_png, quantize_map
from dskd_ray.io.storage import (
    ListingStats,
    canonical_uri,
    check_output,
    check_schemes,
    check_writable,
    explain_read_failure,
    iter_images,
    join_uri,
    map_uri,
    open_object,
    printable,
    read_object,
    uri_scheme,
    write_object,
)
from dskd_ray.nightly.attempts import (
    Attempts,
    clean_stale_scratch,
    remove_run_scratch,
    score_guarded,
)
from dskd_ray.nightly.drift import run_drift
from dskd_ray.nightly.results import (
    MAPS_DIR,
    RESULT_SCHEMA,
    PartWriter,
    commit_run,
    gone_rows,
    manifest_path,
    new_run_id,
    run_partition,
    utc_now,
)
from dskd_ray.nightly.run_index import ModelIndex, hash_rows, member
from dskd_ray.progress import PROGRESS, clock, eta

if TYPE_CHECKING:
    from dskd_ray.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)

# Listed images become an Arrow chunk every this many: the Python objects of one chunk are all
# the listing holds beside its Arrow columns (at 50 000 they were 12 MB, a fifth of a 10⁵
# listing's driver memory; bench/listing.py).
LISTING_CHUNK = 8192

LISTING_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("image_version", pa.string()),
        ("image_bytes", pa.int64()),
        ("listing_error", pa.string()),  # set when the file is not to be read (its name)
    ]
)


class ScoringRunError(DSKDError):
    """The pipeline itself failed (not one image): nothing was committed; run again to finish."""


@dataclass
class RunSummary:
    run_id: str
    model_id: str
    listed: int  # images found under the input
    skipped: int  # already scored by this model (same URI and version)
    scored: int  # rows with status "ok" in this run
    errors: int  # rows with status "error" in this run
    other_files: int  # files without an image extension, not listed
    seconds: float  # the whole run, listing and commit included
    symlinks: int = 0  # symlinks met under the input (local folders)
    symlinks_skipped: int = 0  # of those, not listed: pointing outside the input, nowhere…
    gone: int = 0  # images listed by an earlier run, no longer under the input: a "gone" row
    pipeline_seconds: float = 0.0  # Ray Data: first block in → last row out
    startup_seconds: float = 0.0  # pipeline start → first rows out (actor start, model load)
    startup_rows: int = 0  # rows in that first batch out
    backend: str = ""  # what scored: "torch" or "onnxruntime" ("" when nothing was scored)
    manifest: str = ""
    partition: str = ""

    @property
    def images_per_s(self) -> float:
        done = self.scored + self.errors
        return done / self.pipeline_seconds if self.pipeline_seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Throughput once the first rows are out: the start-up cost left aside."""
        rows = self.scored + self.errors - self.startup_rows
        seconds = self.pipeline_seconds - self.startup_seconds
        return rows / seconds if rows > 0 and seconds > 0 else 0.0

    def format(self) -> str:
        return (
            f"run {self.run_id}: listed {self.listed}, scored {self.scored}, errors {self.errors}, "
            f"skipped {self.skipped} (already scored), gone {self.gone}, "
            f"{self.images_per_s:.1f} images/s{self.format_backend()} ({self.seconds:.1f} s in all)"
        )

    def format_backend(self) -> str:
        return f" with {self.backend}" if self.backend else ""

    def format_symlinks(self) -> str:
        """A line on the symlinks met, or "" when there were none."""
        if not self.symlinks:
            return ""
        return (
            f"{self.symlinks} symlink(s) under INPUT: {self.symlinks - self.symlinks_skipped} to "
            f"images inside INPUT listed, {self.symlinks_skipped} not followed (pointing outside "
            "INPUT, into the output, nowhere, or to a folder whose images are listed anyway)"
        )


# --- resources ---------------------------------------------------------------------------------


@dataclass
class PoolPlan:
    """How the scoring actors and the CPU tasks share the cluster (see `plan_pool`)."""

    device: str  # "cuda" or "cpu", inside each actor
    max_actors: int
    actor_cpus: float
    actor_gpus: float
    threads: int  # torch threads per actor
    task_cpus: float = 1.0  # read + decode tasks
    write_cpus: float = 0.5  # map-writing tasks: mostly waiting on storage


def plan_pool(resources: dict[str, float], options: ScoringOptions) -> PoolPlan:
    """Size the actor pool from the cluster's resources, never a fixed number.

    On 2 CPUs a pool that claims every CPU leaves none for the read tasks and hangs silently
    (docs/design.md §7). So CPU actors together claim at most a quarter of the CPU slots, and the
    torch threads (which do the work) are set inside each actor, not by its claim.
    """
    cpus = max(1.0, float(resources.get("CPU", 1)))
    gpus = int(resources.get("GPU", 0))
    if options.device.startswith("cuda") and gpus == 0:
        raise ConfigError(f"--device {options.device} asked for, but the Ray cluster has no GPUs")
    if options.device not in ("auto", "cpu") and not options.device.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, not {options.device!r}")
    task_cpus = 1.0
    # The onnxruntime backend runs on CPUs (its CUDA provider is a different wheel); "auto"
    # takes the GPUs with torch.
    if gpus and options.device != "cpu" and options.backend != "onnxruntime":
        actors = min(options.actors or gpus, gpus)
        # One GPU per actor; its CPU claim never blocks the decode tasks that feed it.
        actor_cpus = min(1.0, cpus / (4 * actors))
        return PoolPlan("cuda", actors, _not_fusable(actor_cpus, task_cpus), 1.0, 1, task_cpus)
    threads = options.actor_threads or max(1, min(4, int(cpus)))
    actors = options.actors or max(1, round(cpus * 0.75 / threads))
    actor_cpus = min(float(threads), cpus / (4 * actors))
    return PoolPlan("cpu", actors, _not_fusable(actor_cpus, task_cpus), 0.0, threads, task_cpus)


def _not_fusable(actor_cpus: float, task_cpus: float) -> float:
    # Ray Data fuses a task map into the next actor map when their resource claims are equal,
    # which would move decoding into the scoring actor; a different claim keeps them apart.
    actor_cpus = max(0.25, round(actor_cpus * 4) / 4)
    return actor_cpus - 0.25 if actor_cpus == task_cpus else actor_cpus


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS, or a new local Ray) unless already connected."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, configure_logging=False)


# --- the pipeline stages -----------------------------------------------------------------------


def decode_batch(
    batch: dict[str, np.ndarray], image_size: int | None, io_threads: int
) -> dict[str, Any]:
    """Read and decode a block of images (a CPU task) to image_size², or, for a tiled model
    (image_size None), at full resolution. Failures become error rows."""
    uris = [str(u) for u in batch["image_uri"]]
    n = len(uris)
    if image_size is None:  # sizes differ: one array per image (an error row keeps a 1×1)
        images = np.empty(n, object)
        images[:] = [np.zeros((1, 1, 3), np.uint8) for _ in range(n)]
    else:
        images = np.zeros((n, image_size, image_size, 3), np.uint8)
    width = np.full(n, -1, np.int32)
    height = np.full(n, -1, np.int32)
    status = np.full(n, "ok", dtype=object)
    error = np.full(n, "", dtype=object)
    retryable = np.zeros(n, bool)

    def fail(i: int, why: str, retry: bool) -> None:
        status[i], error[i], retryable[i] = "error", why, retry

    # A file the listing refused (a name that is not UTF-8) is not read: its row says why.
    refused = batch.get("listing_error")
    for i in range(n):
        if refused is not None and refused[i]:
            fail(i, str(refused[i]), retry=False)
    sizes = np.array(batch["image_bytes"], np.int64)  # -1: a manifest that did not say
    readable = [i for i in range(n) if status[i] == "ok"]
    # Decoded in a process of its own: an image that crashes the decoder is an error row, not
    # a dead worker whose batch Ray retries without end (decoder_process).
    decoder = shared_decoder()
    if readable:
        with ThreadPoolExecutor(max(1, min(io_threads, len(readable)))) as pool:
            futures = [(i, pool.submit(read_object, uris[i])) for i in readable]
            for i, future in futures:
                try:
                    data = future.result()
                except Exception as e:  # noqa: BLE001 - any read failure: said in its row
                    why, retry = explain_read_failure(uris[i], e)
                    fail(i, f"cannot read: {why}", retry=retry)
                    continue
                sizes[i] = len(data)
                try:
                    images[i], (width[i], height[i]) = decoder.decode(data, image_size)
                except ImageDecodeError as e:  # the same bytes will fail the same way
                    fail(i, str(e), retry=False)
                except DecoderCrashed as e:
                    log.error("%s: %s", printable(uris[i]), e)
                    fail(i, str(e), retry=e.retryable)
                except MemoryError as e:
                    fail(i, f"out of memory: {e}", retry=True)
                except Exception as e:  # noqa: BLE001 - a decoder bug on odd bytes
                    fail(i, f"cannot decode: {_describe(e)}", retry=False)
                del data
    return {
        "image_uri": np.asarray(uris, dtype=object),
        "image_version": batch["image_version"],
        "image_bytes": sizes,
        "width": width,
        "height": height,
        "status": status,
        "error": error,
        "retryable": retryable,
        "image": images,
    }


class ScoringActor:
    """Scores decoded images; one model per actor, loaded once in `__init__`."""

    def __init__(
        self,
        checkpoint: list,
        device: str,
        batch_size: int,
        threads: int,
        precision: str = "fp32",
        compile: bool = False,
        graph: list | None = None,
        run_id: str | None = None,
    ) -> None:
        import torch

        from dskd_ray.model.checkpoint import Checkpoint

        # On Ray: a batch that kills this actor twice is scored image by image, counted in this
        # node's scratch folder (batch_attempts), where a killed run's leftovers are cleaned.
        self.attempts = None
        if run_id is not None:
            clean_stale_scratch()
            self.attempts = Attempts.for_run(run_id)

        # Ray sets OMP_NUM_THREADS=1 in actors (docs/design.md §7): ask for the threads we want.
        torch.set_num_threads(threads)
        if graph is not None:  # --backend onnxruntime: the exported graph, not the checkpoint
            from dskd_ray.onnx.runtime import OnnxScorer

            data = graph[0]
            if not isinstance(data, bytes):  # an object ref: on Ray, not in process
                import ray

                data = ray.get(data)
            self.scorer = OnnxScorer(data, batch_size=batch_size, threads=threads)
            return
        from dskd_ray.inference.scoring import Scorer

        ckpt = checkpoint[0]
        if not isinstance(ckpt, Checkpoint):  # an object ref: on Ray, not in process
            import ray

            ckpt = ray.get(ckpt)
        self.scorer = Scorer(
            ckpt, device=device, batch_size=batch_size, precision=precision, compile=compile
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.attempts is None:
            return self._score(batch)
        return score_guarded(batch, self._score, self.attempts, self._give_up)

    def _give_up(self, batch: dict[str, np.ndarray], why: str) -> dict[str, np.ndarray]:
        n = len(batch["status"])
        batch["status"] = np.full(n, "error", dtype=object)
        batch["error"] = np.full(n, f"scoring crashed: {why}", dtype=object)
        batch["retryable"] = np.ones(n, bool)  # a dead actor is seldom the image's doing
        return self._score(batch)

    def _score(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from dskd_ray.inference.scoring import not_finite_reason

        images = batch.pop("image")
        status = np.array(batch["status"], dtype=object)
        error = np.array(batch["error"], dtype=object)
        retryable = np.array(batch["retryable"], dtype=bool)
        n, size = len(status), self.scorer.image_size
        score = np.full(n, np.nan, np.float32)
        anomalous = np.full(n, -1, np.int8)  # -1: no threshold, or no score
        tiled = self.scorer.tiled
        if tiled:  # each map at its image's size (bounded): one array per row
            quantized = np.empty(n, object)
            quantized[:] = [np.zeros((1, 1), np.uint16) for _ in range(n)]
        else:
            quantized = np.zeros((n, size, size), np.uint16)
        scale = np.zeros(n, np.float64)
        ok = np.flatnonzero(status == "ok")
        if len(ok):
            try:
                if tiled:
                    result = self.scorer.score_images([images[i] for i in ok])
                else:
                    result = self.scorer.score_batch(np.ascontiguousarray(images[ok]))
            except Exception as e:  # noqa: BLE001 - e.g. out of GPU memory: retry next run
                logging.getLogger(__name__).exception("scoring a batch of %d failed", len(ok))
                status[ok], retryable[ok] = "error", True
                error[ok] = f"scoring failed: {_describe(e)}"
            else:
                score[ok] = result.scores
                flags = self.scorer.is_anomalous(result.scores)
                if flags is not None:
                    anomalous[ok] = flags.astype(np.int8)
                finite = result.finite
                for j, i in enumerate(ok):
                    if finite[j]:
                        stored = tiling.bounded(result.maps[j]) if tiled else result.maps[j]
                        quantized[i], scale[i] = quantize_map(stored)
                    else:
                        # Final for this model (its id is in done_keys); another model, with
                        # another id, scores the image again.
                        status[i], retryable[i] = "error", False
                        error[i] = not_finite_reason(float(result.scores[j]))
        return {
            **batch,
            "status": status,
            "error": error,
            "retryable": retryable,
            "score": score,
            "is_anomalous": anomalous,
            "map_q": quantized,
            "map_scale": scale,
        }


def write_maps_batch(
    batch: dict[str, np.ndarray],
    maps_root: str,
    model_id: str,
    run_id: str,
    threshold: float | None,
    io_threads: int,
) -> pa.Table:
    """Write each scored image's map as a 16-bit PNG (a CPU task) and shape the final rows."""
    n = len(batch["status"])
    status = np.array(batch["status"], dtype=object)
    error = np.array(batch["error"], dtype=object)
    retryable = np.array(batch["retryable"], dtype=bool)
    uris: list[str | None] = [None] * n
    futures = {}
    with ThreadPoolExecutor(max(1, min(io_threads, n))) as pool:
        for i in np.flatnonzero(status == "ok"):
            key = map_uri(
                maps_root,
                str(batch["image_uri"][i]),
                str(batch["image_version"][i]),
                model_id,
                run_id,  # a run never overwrites a map that an earlier run's row points at
            )
            png = encode_map_png(batch["map_q"][i], float(batch["map_scale"][i]))
            futures[i] = (key, pool.submit(write_object, key, png))
        for i, (key, future) in futures.items():
            try:
                future.result()
                uris[i] = key
            except Exception as e:  # noqa: BLE001 - the row says so; the next run retries it
                status[i], retryable[i] = "error", True
                error[i] = f"cannot write map: {_describe(e)}"
    ok = status == "ok"
    map_missing = np.array([u is None for u in uris], bool)
    flags = batch["is_anomalous"]
    return pa.table(
        {
            "image_uri": pa.array([str(u) for u in batch["image_uri"]], pa.string()),
            "image_version": pa.array([str(v) for v in batch["image_version"]], pa.string()),
            "image_bytes": pa.array(
                batch["image_bytes"], pa.int64(), mask=batch["image_bytes"] < 0
            ),
            "width": pa.array(batch["width"], pa.int32(), mask=batch["width"] < 0),
            "height": pa.array(batch["height"], pa.int32(), mask=batch["height"] < 0),
            "score": pa.array(batch["score"], pa.float32(), mask=~ok),
            "threshold": pa.array([threshold] * n, pa.float64()),
            "is_anomalous": pa.array(flags == 1, pa.bool_(), mask=(flags < 0) | ~ok),
            "map_uri": pa.array(uris, pa.string()),
            "map_scale": pa.array(batch["map_scale"], pa.float64(), mask=~ok),
            "map_width": pa.array(
                [q.shape[1] for q in batch["map_q"]], pa.int32(), mask=map_missing
            ),
            "map_height": pa.array(
                [q.shape[0] for q in batch["map_q"]], pa.int32(), mask=map_missing
            ),
            "model_id": pa.array([model_id] * n, pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
            "scored_at": pa.array([utc_now()] * n, RESULT_SCHEMA.field("scored_at").type),
            "status": pa.array(list(status), pa.string()),
            "error": pa.array([e or None for e in error], pa.string()),
            "retryable": pa.array(retryable, pa.bool_()),
        },
        schema=RESULT_SCHEMA,
    )


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if type(error).__name__ in text else f"{type(error).__name__}: {text}"


# --- the run -----------------------------------------------------------------------------------


@dataclass
class _Listing:
    table: pa.Table
    stats: ListingStats
    manifest: bool = False  # the input was a manifest: exactly its images, no "gone" rows


def is_manifest(input_uri: str) -> bool:
    """INPUT names a list of images (Parquet or CSV) rather than a folder or prefix of them."""
    return input_uri.lower().endswith((".parquet", ".csv"))


def list_inputs(input_uri: str, output: str, schemes: tuple[str, ...] = ()) -> _Listing:
    """Every image under `input_uri` (or in the manifest it names) with its version; a manifest
    may name s3://, file:// and local paths, and the URI `schemes` besides.

    Built in Arrow chunks as the listing pages arrive, never as one Python object per image
    (about 130 bytes per image on the driver, where a Python dict took about 1 KB).
    """
    if is_manifest(input_uri):
        return _Listing(read_manifest(input_uri, schemes), ListingStats(), manifest=True)
    chunks: list[pa.RecordBatch] = []
    rows: dict[str, list] = {name: [] for name in LISTING_SCHEMA.names}
    stats = ListingStats()

    def flush() -> None:
        if rows["image_uri"]:
            chunks.append(pa.RecordBatch.from_pydict(rows, schema=LISTING_SCHEMA))
            for column in rows.values():
                column.clear()

    for entry in iter_images(input_uri, exclude=output, stats=stats):
        if entry is None:
            stats.other_files += 1
            continue
        rows["image_uri"].append(entry.uri)
        rows["image_version"].append(entry.version)
        rows["image_bytes"].append(entry.size)
        rows["listing_error"].append(entry.error)
        if len(rows["image_uri"]) >= LISTING_CHUNK:
            flush()
    flush()
    return _Listing(pa.Table.from_batches(chunks, schema=LISTING_SCHEMA), stats)


MANIFEST_COLUMNS = ("image_uri", "image_version", "image_bytes")
_URI = r"^([a-zA-Z][a-zA-Z0-9+.-]*://|/)"  # a scheme, or an absolute local path
_SCHEME_PART = r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://"
# A local path with something to resolve: "//", a "." or ".." segment (Arrow's RE2 syntax).
_UNRESOLVED = r"^/(.*/)?(\.\.?)?(/|$)|//"


def _one_spelling(uris: pa.Array) -> pa.Array:
    """Local paths spelled as the listing spells them: file:///a → /a, and "//", ".", ".."
    resolved (only the rows that need it, in Python). Other URIs as written."""
    import posixpath

    uris = pc.replace_substring_regex(uris, pattern="^(?i:file)://(/|$)", replacement="/")
    local = pc.starts_with(uris, "/")
    todo = pc.and_(local, pc.match_substring_regex(uris, _UNRESOLVED))
    if not pc.any(todo).as_py():
        return uris
    values = uris.to_pylist()
    for i in pc.indices_nonzero(todo).to_pylist():
        values[i] = "/" + posixpath.normpath(values[i]).lstrip("/")
    return pa.array(values, pa.string())


def read_manifest(uri: str, schemes: tuple[str, ...] = ()) -> pa.Table:
    """The images a manifest names (LISTING_SCHEMA): column `image_uri`, optionally
    `image_version` (missing: the image is scored once per URI) and `image_bytes`.

    Read in record batches, only those columns. A manifest that cannot say exactly which
    images to score (no such column, an empty or relative URI, a URI twice) is refused whole,
    and so is one naming a scheme other than s3://, file:// and `schemes`. Local paths are
    compared spelled one way (file:// dropped, ".", ".." and "//" resolved): two spellings of
    one file are the same URI twice. Keys on object storage are taken as written: there
    "a/../b" is a key of its own.
    """
    from pyarrow import csv, parquet

    name = uri.rsplit("/", 1)[-1]
    chunks = []
    try:
        with open_object(uri) as f:
            if uri.lower().endswith(".parquet"):
                source = parquet.ParquetFile(f)
                columns = source.schema_arrow.names
                _check_manifest_columns(name, columns)
                wanted = [c for c in MANIFEST_COLUMNS if c in columns]
                batches = source.iter_batches(batch_size=65_536, columns=wanted)
            else:
                types = {"image_uri": pa.string(), "image_version": pa.string()}
                convert = csv.ConvertOptions(column_types=types, strings_can_be_null=True)
                batches = csv.open_csv(f, convert_options=convert)
                _check_manifest_columns(name, batches.schema.names)
            offset = 0
            for batch in batches:
                table = pa.Table.from_batches([batch])
                chunks.append(_manifest_chunk(name, table, offset, schemes))
                offset += batch.num_rows
    except FileNotFoundError:
        raise DataError(f"manifest {uri} does not exist") from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        why = " ".join(str(e).split())
        raise DataError(f"manifest {uri} cannot be read as {name.rsplit('.', 1)[-1]}: {why}") from e
    table = pa.concat_tables(chunks) if chunks else LISTING_SCHEMA.empty_table()
    if pc.count_distinct(table["image_uri"]).as_py() != table.num_rows:
        counts = pc.value_counts(table["image_uri"])
        twice = counts.filter(pc.greater(counts.field("counts"), 1))
        raise DataError(
            f"manifest {name} lists {twice[0]['values'].as_py()} more than once "
            f"({len(twice)} URI(s) repeated, local paths compared spelled one way): one row "
            "per image"
        )
    return table


def _check_manifest_columns(name: str, columns: list[str]) -> None:
    if "image_uri" not in columns:
        raise DataError(
            f"manifest {name} has no column image_uri (it has: {', '.join(columns) or 'none'})"
        )


def _manifest_chunk(name: str, chunk: pa.Table, offset: int, schemes: tuple[str, ...]) -> pa.Table:
    uris = chunk["image_uri"].cast(pa.string()).combine_chunks()
    bad = pc.invert(pc.fill_null(pc.match_substring_regex(uris, _URI), False))
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        value = uris[i].as_py()
        shown = "empty" if not value else f"{value!r} is not absolute (a path from / or a URI)"
        raise DataError(f"manifest {name}, row {offset + i + 1}: image_uri {shown}")
    found = pc.unique(pc.utf8_lower(pc.extract_regex(uris, _SCHEME_PART).field("scheme")))
    unknown = {s for s in found.to_pylist() if s} - {"s3", "file", *schemes}
    if unknown:
        scheme = sorted(unknown)[0]
        i = pc.index(pc.starts_with(pc.utf8_lower(uris), f"{scheme}://"), True).as_py()
        check_schemes({scheme}, schemes, f"manifest {name}, row {offset + i + 1},")
    uris = _one_spelling(uris)
    n = chunk.num_rows
    if "image_version" in chunk.column_names:
        versions = pc.fill_null(chunk["image_version"].cast(pa.string()), "")
    else:
        versions = pa.array([""] * n, pa.string())
    if "image_bytes" in chunk.column_names:
        sizes = pc.fill_null(chunk["image_bytes"].cast(pa.int64()), -1)
    else:
        sizes = pa.array(np.full(n, -1, np.int64))  # unknown: the read fills it in
    return pa.table(
        [uris, versions, sizes, pa.nulls(n, pa.string())], schema=LISTING_SCHEMA
    ).combine_chunks()


@dataclass
class _Progress:
    start: float
    backend: str = ""  # the one that ran: "torch" or "onnxruntime"
    rows: int = 0
    first_rows_at: float | None = None
    first_rows: int = 0
    last_log: float = field(default_factory=time.perf_counter)

    def update(self, n: int, total: int) -> None:
        now = time.perf_counter()
        self.rows += n
        if self.first_rows_at is None:
            self.first_rows_at, self.first_rows = now, n
        if now - self.last_log > 10 or self.rows == total:
            self.last_log = now
            elapsed = now - self.start
            PROGRESS.info(
                "scored %d/%d images (%.1f images/s), elapsed %s, ETA %s",
                self.rows, total, self.rows / max(elapsed, 1e-9), clock(elapsed),
                eta(self.rows, total, elapsed),
            )  # fmt: skip


@dataclass
class _Plan:
    """Tonight's work: what is listed, what this model already did, what is left."""

    listing: _Listing
    done: np.ndarray | None  # per listed image: already scored by this model (None: nothing is)
    skipped: int
    gone: pa.Table  # RESULT_SCHEMA rows saying "gone", already stamped with the run id
    index: ModelIndex  # this model's latest row per image before this run

    @property
    def to_score(self) -> pa.Table:
        """LISTING_SCHEMA: the listed images left to score (a copy: made once, by the run)."""
        table = self.listing.table
        return table if self.done is None else table.filter(pa.array(~self.done))


def _plan(
    input_uri: str,
    output: str,
    model_id: str,
    run_id: str,
    rescore: bool,
    schemes: tuple[str, ...] = (),
) -> _Plan:
    # The model's latest row per image, from its compact index (run_index): hashes, 21 bytes an
    # image, read before the listing arrives. The done keys are 64-bit hashes: the driver never
    # holds a key string per image beside the listing itself.
    index = ModelIndex.load(output, model_id)
    finished = index.done_keys() if len(index) and not rescore else None
    listing = list_inputs(input_uri, output, schemes)
    table = listing.table
    done = None
    if finished is not None and table.num_rows:
        done = np.concatenate(
            [
                member(hash_rows([b["image_uri"], b["image_version"]]), finished)
                for b in table.to_batches()
            ]
        )
    del finished
    if listing.manifest or not len(index):  # absent from a manifest is not gone
        gone = RESULT_SCHEMA.empty_table()
    else:
        listed = hash_rows([listing.table["image_uri"]])
        listed.sort()  # in place (`member` needs it sorted, not unique)
        prefix = canonical_uri(input_uri)
        missing = index.missing(listed, prefix)  # strings read only for what is not listed
        gone = gone_rows(missing, pa.array([], pa.string()), prefix, model_id, run_id)
    skipped = int(done.sum()) if done is not None else 0
    log.info(
        "listed %d images in %s; %d already scored; %d to score",
        listing.table.num_rows,
        input_uri,
        skipped,
        listing.table.num_rows - skipped,
    )
    return _Plan(listing, done, skipped, gone, index)


@dataclass
class DryRunSummary:
    """What `score_images` would do tonight; nothing was read, scored or written."""

    model_id: str
    listed: int
    listed_bytes: int  # of the images listed whose size is known (a manifest may not say)
    skipped: int  # already scored by this model
    to_score: int
    to_score_bytes: int
    unknown_bytes: int  # images to score whose size the manifest did not give
    gone: int  # would get a "gone" row
    other_files: int
    seconds: float  # in all, the model's id (a checkpoint load) included
    listing_seconds: float = 0.0  # listing, then the diff against what is done

    def format(self) -> str:
        return (
            f"dry run: listed {self.listed} ({_bytes(self.listed_bytes)}), "
            f"skipped {self.skipped} (already scored), to score {self.to_score} "
            f"({_sized(self.to_score_bytes, self.unknown_bytes)}), gone {self.gone}, "
            f"other files {self.other_files}; {self.seconds:.1f} s (listing and diff "
            f"{self.listing_seconds:.1f} s); nothing scored or written"
        )


def _sized(n: int, unknown: int) -> str:
    return f"{_bytes(n)}; size unknown for {unknown}" if unknown else _bytes(n)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def dry_run(
    input_uri: str, model: str, output: str, options: ScoringOptions | None = None
) -> DryRunSummary:
    """List, diff against what this model already scored, and count; score and write nothing.

    The model id comes from the checkpoint's header (`checkpoint_header`): no torch, no weights
    read, so the driver holds the listing and the index and little else."""
    from dskd_ray.model.checkpoint_header import read_model_id

    options = options or ScoringOptions()
    options.validate()
    # The scheme first: resolving INPUT's filesystem (check_output) may already connect.
    check_schemes({uri_scheme(input_uri)}, options.schemes, f"INPUT {input_uri}")
    check_output(input_uri, output)
    check_writable(output)  # what the real run would find only after scoring every image
    start = time.perf_counter()
    try:
        model_id = read_model_id(model)
    except CheckpointError:  # the full load is the authority: its error, as the run would say it
        model_id = None
    if model_id is None:  # a file from before ids were stored: the full load computes it
        from dskd_ray.model.checkpoint import load_checkpoint

        model_id = load_checkpoint(model).model_id
    listing_start = time.perf_counter()
    plan = _plan(input_uri, output, model_id, "dry-run", options.rescore, options.schemes)
    listed_sizes = plan.listing.table["image_bytes"]
    # Counted through the mask: the dry run never copies the rows left to score.
    sizes = listed_sizes if plan.done is None else listed_sizes.filter(pa.array(~plan.done))
    known = pc.greater_equal(sizes, 0)
    return DryRunSummary(
        model_id=model_id,
        listed=plan.listing.table.num_rows,
        listed_bytes=int(pc.sum(pc.max_element_wise(listed_sizes, 0)).as_py() or 0),
        skipped=plan.skipped,
        to_score=len(sizes),
        to_score_bytes=int(pc.sum(sizes.filter(known)).as_py() or 0),
        unknown_bytes=len(sizes) - int(pc.sum(known).as_py() or 0),
        gone=plan.gone.num_rows,
        other_files=plan.listing.stats.other_files,
        seconds=time.perf_counter() - start,
        listing_seconds=time.perf_counter() - listing_start,
    )


def score_images(
    input_uri: str,
    model: str,
    output: str,
    options: ScoringOptions | None = None,
    address: str | None = None,
) -> RunSummary:
    """Score every image under `input_uri` (or in the manifest it names) not yet scored by this
    model; commit one run.

    input_uri, model and output: local paths or s3:// URIs; an input ending in .parquet or .csv
    is a manifest (`read_manifest`). Returns the run's summary, which is also in the manifest.
    """
    # torch is imported here and in the actors, not at module level: the read/decode and
    # map-writing tasks import this module too, and start seconds sooner without it.
    from dskd_ray.model.checkpoint import library_versions, load_checkpoint

    options = options or ScoringOptions()
    options.validate()  # before Ray starts, not inside an actor
    # The scheme first: resolving INPUT's filesystem (check_output) may already connect.
    check_schemes({uri_scheme(input_uri)}, options.schemes, f"INPUT {input_uri}")
    check_output(input_uri, output)
    check_writable(output)  # before a night of scoring, not after it
    start = time.perf_counter()
    started_at = utc_now()
    checkpoint = load_checkpoint(model)
    model_id = checkpoint.model_id
    run_id = options.run_id or new_run_id()

    plan = _plan(input_uri, output, model_id, run_id, options.rescore, options.schemes)
    table, gone = plan.to_score, plan.gone
    listed_count = plan.listing.table.num_rows
    stats = plan.listing.stats
    plan.listing.table = LISTING_SCHEMA.empty_table()  # the driver keeps only what it scores

    writer = PartWriter(output, run_id, options.rows_per_file)
    if gone.num_rows:
        log.info(
            "%d image(s) listed by an earlier run are no longer under %s", gone.num_rows, input_uri
        )
        writer.write(gone)
    counts = {"ok": 0, "error": 0}
    pipeline_s = startup_s = 0.0
    startup_rows = 0
    backend = ""
    if table.num_rows:
        run = _run_in_process if _in_process(table.num_rows, options, address) else _run_pipeline
        try:
            progress = run(table, checkpoint, output, run_id, options, address, writer, counts)
        except (DSKDError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise ScoringRunError(
                f"run {run_id} failed and was not committed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); the next run scores its images"
            ) from e
        pipeline_s = time.perf_counter() - progress.start
        startup_s = (progress.first_rows_at or progress.start) - progress.start
        startup_rows = progress.first_rows
        backend = progress.backend
    files = writer.close()

    summary = RunSummary(
        run_id=run_id,
        model_id=model_id,
        listed=listed_count,
        skipped=plan.skipped,
        scored=counts["ok"],
        errors=counts["error"],
        other_files=stats.other_files,
        symlinks=stats.symlinks,
        symlinks_skipped=stats.symlinks_skipped,
        gone=gone.num_rows,
        seconds=0.0,
        pipeline_seconds=pipeline_s,
        startup_seconds=startup_s,
        startup_rows=startup_rows,
        backend=backend,
        partition=join_uri(output, run_partition(run_id)),
    )
    if summary.scored + summary.errors != table.num_rows:  # never commit a run that lost rows
        raise ScoringRunError(
            f"run {run_id} wrote {summary.scored + summary.errors} rows for {table.num_rows} images; "
            "not committing it (its images are scored again by the next run)"
        )
    del table
    summary.seconds = time.perf_counter() - start
    summary.manifest = join_uri(output, manifest_path(run_id))
    commit_run(
        output,
        run_id,
        files,
        model_id=model_id,
        model=model,
        input=input_uri,
        started_at=started_at.isoformat(),
        finished_at=utc_now().isoformat(),
        summary={
            **asdict(summary),
            "images_per_s": summary.images_per_s,
            "steady_images_per_s": summary.steady_images_per_s,
        },
        # The backend that ran, not the one asked for ("auto"), which is kept beside it.
        options={**asdict(options), "backend": backend or None, "backend_asked": options.backend},
        versions=library_versions(),
        drift=run_drift(run_id, writer.scores(), checkpoint.threshold).to_dict(),
    )
    # The index after the manifest: it only ever holds committed rows. A run that dies between
    # the two leaves the index as it was, and the next run folds this one in from its parts.
    try:
        plan.index.write(run_id, files)
    except Exception as e:  # noqa: BLE001 - the run is committed: a stale index costs time only
        log.warning("run %s is committed, but its index was not written (%s): the next run "
                    "reads this run's parts instead", run_id, e)  # fmt: skip
    log.info("%s", summary.format())
    return summary


def _in_process(images: int, options: ScoringOptions, address: str | None) -> bool:
    import sys

    if images > options.in_process_max or address or os.environ.get("RAY_ADDRESS"):
        return False
    # A Ray this process already started (a notebook, a test) is used rather than bypassed.
    return "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def _choose_backend(
    options: ScoringOptions, device: str, images: int, checkpoint: Checkpoint
) -> tuple[str, bytes | None]:
    """The backend this run uses (`ScoringOptions.resolve_backend`) and, for onnxruntime, the
    model's checked graph: exported here, on the driver, on its first run, then cached."""
    from dskd_ray.onnx.export import cached_graph, graph_cache_path
    from dskd_ray.onnx.graph import ExportError, onnx_installed

    installed = onnx_installed()
    cached = installed and graph_cache_path(checkpoint).is_file()
    backend, why = options.resolve_backend(device, images, cached, installed)
    graph = None
    if backend == "onnxruntime":
        try:
            graph = cached_graph(checkpoint)
        except ExportError as e:
            if options.backend != "auto":
                raise
            backend, why = "torch", f"the model's graph could not be exported: {e}"
    log.info("scoring with %s: %s", backend, why)
    return backend, graph


def _run_in_process(
    table: pa.Table,
    checkpoint: Checkpoint,
    output: str,
    run_id: str,
    options: ScoringOptions,
    address: str | None,
    writer: PartWriter,
    counts: dict[str, int],
) -> _Progress:
    """The pipeline's three stages, one block after the other, in this process: a handful of
    images is scored in seconds, where starting Ray and an actor takes half a minute."""
    del address
    if options.device.startswith("cuda"):
        device = options.device
    else:
        import torch

        device = "cuda" if options.device == "auto" and torch.cuda.is_available() else "cpu"
    log.info("scoring %d images in this process (no Ray)", table.num_rows)
    progress = _Progress(start=time.perf_counter())
    progress.backend, graph = _choose_backend(options, device, table.num_rows, checkpoint)
    scorer = ScoringActor(
        [replace(checkpoint, training=None)],
        device=device,
        batch_size=options.batch_size,
        threads=options.actor_threads or os.cpu_count() or 1,
        precision=options.precision,
        compile=options.compile,
        graph=None if graph is None else [graph],
    )
    for start in range(0, table.num_rows, options.batch_size):
        block = table.slice(start, options.batch_size)
        batch = {name: block[name].to_numpy(zero_copy_only=False) for name in block.column_names}
        decoded = decode_batch(batch, scorer.scorer.decode_size, options.io_threads)
        rows = write_maps_batch(
            scorer(decoded),
            join_uri(output, MAPS_DIR),
            checkpoint.model_id,
            run_id,
            checkpoint.threshold.value if checkpoint.threshold else None,
            options.io_threads,
        )
        statuses = rows["status"].to_pylist()
        counts["ok"] += statuses.count("ok")
        counts["error"] += len(statuses) - statuses.count("ok")
        writer.write(rows)
        progress.update(rows.num_rows, table.num_rows)
    return progress


def _run_pipeline(
    table: pa.Table,
    checkpoint: Checkpoint,
    output: str,
    run_id: str,
    options: ScoringOptions,
    address: str | None,
    writer: PartWriter,
    counts: dict[str, int],
) -> _Progress:
    import ray

    ensure_ray(address)
    plan = plan_pool(ray.cluster_resources(), options)
    log.info("scoring pool: %s", plan)
    threshold = checkpoint.threshold.value if checkpoint.threshold else None
    image_size = checkpoint.config.image_size
    block_rows = max(1, options.batch_size)
    blocks = [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)]
    checkpoint_ref = ray.put(replace(checkpoint, training=None))  # fetched once per actor
    backend, graph = _choose_backend(options, plan.device, table.num_rows, checkpoint)
    graph_ref = None if graph is None else ray.put(graph)  # exported and checked once, here
    del graph
    clean_stale_scratch()  # what killed runs left on this node (the actors clean theirs)
    progress = _Progress(start=time.perf_counter(), backend=backend)
    ds = (
        ray.data.from_arrow(blocks)
        .map_batches(
            decode_batch,
            batch_size=None,
            batch_format="numpy",
            num_cpus=plan.task_cpus,
            # A tiled model's images are decoded whole (None): tiles are cut in the actor.
            fn_kwargs={
                "image_size": None if checkpoint.config.tiled else image_size,
                "io_threads": options.io_threads,
            },
        )
        .map_batches(
            ScoringActor,
            batch_size=options.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.max_actors),
            num_cpus=plan.actor_cpus,
            num_gpus=plan.actor_gpus,
            fn_constructor_kwargs={
                "checkpoint": [checkpoint_ref],  # in a list: the actor fetches it itself
                "device": plan.device,
                "batch_size": options.batch_size,
                "threads": plan.threads,
                "precision": options.precision,
                "compile": options.compile,
                "graph": None if graph_ref is None else [graph_ref],
                "run_id": run_id,  # the actors count attempts in its scratch folder
            },
        )
        .map_batches(
            write_maps_batch,
            batch_size=None,
            batch_format="numpy",
            num_cpus=plan.write_cpus,
            fn_kwargs={
                "maps_root": join_uri(output, MAPS_DIR),
                "model_id": checkpoint.model_id,
                "run_id": run_id,
                "threshold": threshold,
                "io_threads": options.io_threads,
            },
        )
    )
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    ended_well = False
    try:
        for batch in batches:
            statuses = batch["status"].to_pylist()
            counts["ok"] += statuses.count("ok")
            counts["error"] += len(statuses) - statuses.count("ok")
            writer.write(batch)
            progress.update(batch.num_rows, table.num_rows)
        ended_well = True
    finally:
        # A run that stops early (Ctrl-C, a failure) shuts its pipeline down now, its actors
        # killed, rather than when the iterator is collected.
        batches.close()
        # This node's scratch; where actors end well they leave none (batch_attempts).
        remove_run_scratch(run_id, linger_s=0.0 if ended_well else 2.0)
    del checkpoint_ref, graph_ref
    return progress
