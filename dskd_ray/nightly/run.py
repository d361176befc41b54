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

This module runs the whole job (`score_images`); beside it: `listing.py` (what to score),
`plan.py` (what is left, the dry run), `pool.py` (the pool's size), `stages.py` (decode, score,
write maps).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from dskd_ray.config import ScoringOptions
from dskd_ray.errors import DSKDError
from dskd_ray.io.storage import check_schemes, check_writable, join_uri, uri_scheme
from dskd_ray.io.storage_listing import check_output
from dskd_ray.nightly.attempts import (
    clean_stale_scratch,
    remove_run_scratch,
)
from dskd_ray.nightly.drift import run_drift
from dskd_ray.nightly.listing import LISTING_SCHEMA
from dskd_ray.nightly.plan import _plan
from dskd_ray.nightly.pool import PoolPlan, ensure_ray, plan_pool
from dskd_ray.nightly.results import (
    MAPS_DIR,
    PartWriter,
    commit_run,
    manifest_path,
    new_run_id,
    run_partition,
    utc_now,
)
from dskd_ray.nightly.stages import (
    ModelSpec,
    ScorerSpec,
    ScoringActor,
    decode_batch,
    write_maps_batch,
)
from dskd_ray.progress import PROGRESS, clock, eta

if TYPE_CHECKING:
    from dskd_ray.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)


class ScoringRunError(DSKDError):
    """The pipeline itself failed (not one image): nothing was committed; run again to finish."""


@dataclass
class RunSummary:
    run_id: str
    model_id: str | None  # None for a run of several models (`routes`)
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
    routes: list[Any] = field(default_factory=list)  # a run of several models: `RouteSummary`s

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


@dataclass(frozen=True)
class _RunInput:
    """What a runner scores and where its rows go: the same for both runners."""

    blocks: list[pa.Table]  # the images left to score; each block one model's (`model_key`)
    images: int
    models: tuple[ModelSpec, ...]
    output: str
    run_id: str
    options: ScoringOptions
    writer: PartWriter
    routes: tuple[str | None, ...] = ()  # route names, by `route_code` (runs of several models)

    def decode_kwargs(self) -> dict:
        several = len(self.models) > 1
        return {
            "image_size": self.models[0].decode_size,
            "io_threads": self.options.io_threads,
            "model_sizes": tuple(m.decode_size for m in self.models) if several else None,
        }

    def write_kwargs(self) -> dict:
        return {
            "maps_root": join_uri(self.output, MAPS_DIR),
            "run_id": self.run_id,
            "io_threads": self.options.io_threads,
            "routes": self.routes,
        }


@dataclass(frozen=True)
class _Engine:
    """Where a run scores: in this process (`pool` None) or on Ray, and on which device."""

    device: str
    pool: PoolPlan | None = None


@dataclass
class _Progress:
    """What a runner returns: its rows by status, and when the first ones came out."""

    start: float
    ok: int = 0  # rows with status "ok"
    error: int = 0  # rows with status "error"
    rows: int = 0
    first_rows_at: float | None = None
    first_rows: int = 0
    last_log: float = field(default_factory=time.perf_counter)

    def add(self, rows: pa.Table, total: int) -> None:
        """Count a batch of rows out (written), by status; log the progress now and then."""
        statuses = rows["status"].to_pylist()
        self.ok += statuses.count("ok")
        self.error += len(statuses) - statuses.count("ok")
        now = time.perf_counter()
        n = rows.num_rows
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
    checkpoint.require_finished(model)
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
    scored = errors = startup_rows = 0
    pipeline_s = startup_s = 0.0
    backend = ""
    if table.num_rows:
        with _run_failure(run_id):
            engine = _engine(table.num_rows, options, address)
            spec, backend = model_spec(checkpoint, table.num_rows, options, engine)
            blocks = [
                table.slice(i, options.batch_size)
                for i in range(0, table.num_rows, options.batch_size)
            ]
            run = _RunInput(blocks, table.num_rows, (spec,), output, run_id, options, writer)
            progress = run_stages(run, engine)
        scored, errors = progress.ok, progress.error
        pipeline_s = time.perf_counter() - progress.start
        startup_s = (progress.first_rows_at or progress.start) - progress.start
        startup_rows = progress.first_rows
    files = writer.close()

    summary = RunSummary(
        run_id=run_id,
        model_id=model_id,
        listed=listed_count,
        skipped=plan.skipped,
        scored=scored,
        errors=errors,
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


@contextlib.contextmanager
def _run_failure(run_id: str) -> Iterator[None]:
    """The pipeline's own failure (not one image's) as one ScoringRunError: nothing committed."""
    try:
        yield
    except (DSKDError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise ScoringRunError(
            f"run {run_id} failed and was not committed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the next run scores its images"
        ) from e


def _in_process(images: int, options: ScoringOptions, address: str | None) -> bool:
    import sys

    if images > options.in_process_max or address or os.environ.get("RAY_ADDRESS"):
        return False
    # A Ray this process already started (a notebook, a test) is used rather than bypassed.
    return "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def _engine(images: int, options: ScoringOptions, address: str | None) -> _Engine:
    """In this process for a handful of images with no Ray named or running; else on Ray (a
    cluster connected to, or a new local one), the pool sized from its resources."""
    if _in_process(images, options, address):
        if options.device.startswith("cuda"):
            device = options.device
        else:
            import torch

            device = "cuda" if options.device == "auto" and torch.cuda.is_available() else "cpu"
        log.info("scoring %d images in this process (no Ray)", images)
        return _Engine(device)
    import ray

    ensure_ray(address)
    pool = plan_pool(ray.cluster_resources(), options)
    log.info("scoring pool: %s", pool)
    return _Engine(pool.device, pool)


def _choose_backend(
    options: ScoringOptions, device: str, images: int, checkpoint: Checkpoint
) -> tuple[str, bytes | None]:
    """The backend this model uses (`ScoringOptions.resolve_backend`) and, for onnxruntime, the
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


def model_spec(
    checkpoint: Checkpoint,
    images: int,
    options: ScoringOptions,
    engine: _Engine,
    source: str | None = None,
) -> tuple[ModelSpec, str]:
    """What the actors build one model from, and its backend (decided per model: its own
    images and graph cache). On Ray the checkpoint or graph goes to the object store once,
    for every actor to fetch; in this process it is kept, or with `source`, read again there
    when first needed (the driver then holds one checkpoint at a time)."""
    backend, graph = _choose_backend(options, engine.device, images, checkpoint)
    weights: Any = None if graph is not None else checkpoint
    if engine.pool is not None:
        import ray

        weights = None if graph is not None else ray.put(replace(checkpoint, training=None))
        graph = None if graph is None else ray.put(graph)  # exported and checked once, here
    elif source is not None and weights is not None:
        weights = source
    threshold = checkpoint.threshold.value if checkpoint.threshold else None
    config = checkpoint.config
    spec = ModelSpec(
        checkpoint.model_id, threshold, config.image_size, config.tiled, weights, graph
    )
    return spec, backend


def run_stages(run: _RunInput, engine: _Engine) -> _Progress:
    """Score `run`'s blocks on `engine`: the same three stages in this process or on Ray."""
    if engine.pool is None:
        return _run_in_process(run, engine)
    return _run_pipeline(run, engine.pool)


def _scorer_spec(run: _RunInput, device: str, threads: int, run_id: str | None) -> ScorerSpec:
    options = run.options
    return ScorerSpec(
        run.models,
        device=device,
        batch_size=options.batch_size,
        threads=threads,
        precision=options.precision,
        compile=options.compile,
        run_id=run_id,
        models_per_actor=options.models_per_actor,
    )


def _run_in_process(run: _RunInput, engine: _Engine) -> _Progress:
    """The pipeline's three stages, one block after the other, in this process: a handful of
    images is scored in seconds, where starting Ray and an actor takes half a minute."""
    options = run.options
    progress = _Progress(start=time.perf_counter())
    threads = options.actor_threads or os.cpu_count() or 1
    scorer = ScoringActor(_scorer_spec(run, engine.device, threads, None))
    for block in run.blocks:
        batch = {name: block[name].to_numpy(zero_copy_only=False) for name in block.column_names}
        decoded = decode_batch(batch, **run.decode_kwargs())
        rows = write_maps_batch(scorer(decoded), **run.write_kwargs())
        run.writer.write(rows)
        progress.add(rows, run.images)
    return progress


def _run_pipeline(run: _RunInput, plan: PoolPlan) -> _Progress:
    """The pipeline on Ray Data: decode tasks, an actor pool scoring, map-writing tasks."""
    import ray

    options, run_id = run.options, run.run_id
    clean_stale_scratch()  # what killed runs left on this node (the actors clean theirs)
    progress = _Progress(start=time.perf_counter())
    several = len(run.models) > 1
    ds = (
        ray.data.from_arrow(run.blocks)
        .map_batches(
            decode_batch,
            batch_size=None,
            batch_format="numpy",
            num_cpus=plan.task_cpus,
            # A tiled model's images are decoded whole (None): tiles are cut in the actor.
            fn_kwargs=run.decode_kwargs(),
        )
        .map_batches(
            ScoringActor,
            # Several models: a block is one model's images at one size, scored as it comes;
            # batches cut across blocks would mix them.
            batch_size=None if several else options.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.max_actors),
            num_cpus=plan.actor_cpus,
            num_gpus=plan.actor_gpus,
            # Inside the spec, the checkpoints and graphs are object refs: each actor fetches
            # the ones it needs itself (the actors count attempts in the run's scratch folder).
            fn_constructor_kwargs={"spec": _scorer_spec(run, plan.device, plan.threads, run_id)},
        )
        .map_batches(
            write_maps_batch,
            batch_size=None,
            batch_format="numpy",
            num_cpus=plan.write_cpus,
            fn_kwargs=run.write_kwargs(),
        )
    )
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    ended_well = False
    try:
        for batch in batches:
            run.writer.write(batch)
            progress.add(batch, run.images)
        ended_well = True
    finally:
        # A run that stops early (Ctrl-C, a failure) shuts its pipeline down now, its actors
        # killed, rather than when the iterator is collected.
        batches.close()
        # This node's scratch; where actors end well they leave none (batch_attempts).
        remove_run_scratch(run_id, linger_s=0.0 if ended_well else 2.0)
    return progress
