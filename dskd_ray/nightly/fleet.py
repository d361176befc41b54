"""A night of several models: every route's images scored in one run, each by its own model
(`dskd score INPUT --models MODELS`, `--routes FILE`, or a manifest's `model` column).

    list once → route each image (`routes.Router`) → read each model's header (its id, no torch)
      → per model: skip what it already scored (its own index), "gone" rows
      → load each model in turn (verified) and put it in Ray's object store
      → one pipeline (`run.run_stages`): blocks formed per model, one actor pool whose actors
        load a model when a block first needs it and keep the few they used last
      → one commit: the manifest names every route, its model, its counts and drift
      → each model's index rewritten from the parts that hold its rows

Every listed image leaves one row. An image no route gives a model, and every image of a route
whose model cannot be used (missing, corrupt, of a later format, unfinished), get error rows
that say so, retryable: the next night tries them again. Every other route is scored: one bad
model never fails the night. The skip stays per model, so a model replaced between nights (a new
id) scores its own route again and no other. A run of one `--model` is `run.score_images`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dskd_ray.config import ScoringOptions
from dskd_ray.errors import CheckpointError, DSKDError
from dskd_ray.io.storage import (
    canonical_uri,
    check_schemes,
    check_writable,
    join_uri,
    printable,
    uri_scheme,
)
from dskd_ray.io.storage_listing import check_output
from dskd_ray.nightly.drift import run_drift
from dskd_ray.nightly.listing import _Listing, list_inputs
from dskd_ray.nightly.plan import _bytes, _sized
from dskd_ray.nightly.results import (
    RESULT_SCHEMA,
    PartWriter,
    commit_run,
    gone_rows,
    manifest_path,
    new_run_id,
    run_partition,
    utc_now,
)
from dskd_ray.nightly.routes import Route, Router, Routing
from dskd_ray.nightly.run import (
    RunSummary,
    ScoringRunError,
    _engine,
    _run_failure,
    _RunInput,
    model_spec,
    run_stages,
)
from dskd_ray.nightly.run_index import ModelIndex, hash_rows, member

if TYPE_CHECKING:
    from dskd_ray.model.checkpoint import Threshold

log = logging.getLogger(__name__)

UNUSABLE = "model unusable"  # the error kind of a route whose model cannot score


@dataclass
class RouteSummary:
    """One route of a night: its model and what became of its images."""

    route: str | None  # None: the images in no route
    model: str | None  # the checkpoint's URI (None: no model)
    model_id: str | None  # None: no model, or one that cannot be used (`problem`)
    listed: int = 0
    skipped: int = 0  # already scored by this model
    to_score: int = 0  # the dry run: images its model would score
    to_score_bytes: int = 0
    unknown_bytes: int = 0  # of those, whose size a manifest did not give
    scored: int = 0
    errors: int = 0
    gone: int = 0
    backend: str = ""
    problem: str = ""  # why its images are error rows: no model, or one that cannot be used
    drift: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return "(no route)" if self.route is None else printable(self.route)


@dataclass
class _Model:
    """A checkpoint the night's routes name, read once."""

    uri: str
    model_id: str | None = None  # from its header; None when `problem`
    problem: str = ""  # why it cannot score: its images' rows say so
    index: ModelIndex | None = None


@dataclass
class _FleetPlan:
    """Tonight's work: each listed image's route, what each model already did, what is left."""

    listing: _Listing
    routes: list[Route]
    codes: np.ndarray  # per listed image, its route (an index into `routes`)
    models: dict[str, _Model]  # by URI
    done: np.ndarray  # per listed image: already scored by its route's model
    gone: pa.Table  # RESULT_SCHEMA rows saying "gone", with their route

    def model(self, code: int) -> _Model | None:
        uri = self.routes[code].model
        return None if uri is None else self.models[uri]

    def problem(self, code: int) -> str:
        """Why route `code`'s images get error rows, or "" when its model scores them."""
        route, model = self.routes[code], self.model(code)
        if model is None:
            return route.why
        return f"{UNUSABLE}: {model.problem}" if model.problem else ""


def _read_model(uri: str) -> _Model:
    """A model's id from its header (no torch, no weights; a file from before ids were stored
    is loaded for it); a model that cannot be used says why instead."""
    from dskd_ray.model.checkpoint_header import read_header, read_model_id, unreadable_format

    try:
        refused = unreadable_format(uri, read_header(uri)["format"])
        if refused is not None:
            raise refused
        model_id = read_model_id(uri)
        if model_id is None:
            from dskd_ray.model.checkpoint import load_checkpoint

            checkpoint = load_checkpoint(uri)
            checkpoint.require_finished(uri)
            model_id = checkpoint.model_id
    except DSKDError as e:
        log.warning("route model %s cannot be used: %s", uri, e)
        return _Model(uri, problem=str(e))
    return _Model(uri, model_id)


def _plan_fleet(
    input_uri: str, output: str, routing: Routing, run_id: str, options: ScoringOptions
) -> _FleetPlan:
    listing = list_inputs(input_uri, output, options.schemes, with_model=True)
    router = Router(routing, input_uri, listing.manifest)
    table = listing.table
    codes = router.codes(table["image_uri"], listing.models)
    listing.models = None
    routes = list(router.routes)  # the gone rows' routes below must not add to them
    models: dict[str, _Model] = {}
    for route in routes:
        if route.model is not None and route.model not in models:
            models[route.model] = _read_model(route.model)
    by_id: dict[str, list[int]] = {}
    for code, route in enumerate(routes):
        model = models.get(route.model) if route.model else None
        if model is not None and model.model_id:
            by_id.setdefault(model.model_id, []).append(code)
    done = np.zeros(table.num_rows, bool)
    gone = [RESULT_SCHEMA.empty_table()]
    keys = listed = None  # 64-bit hashes, made once, when some model has scored anything
    prefix = canonical_uri(input_uri) if not listing.manifest else ""
    for model_id, route_codes in by_id.items():
        # Each model's latest row per image, from its own index: the skip stays per model.
        index = ModelIndex.load(output, model_id)
        for model in models.values():
            if model.model_id == model_id:
                model.index = index
        if not len(index):
            continue
        rows = np.isin(codes, route_codes)
        if not options.rescore and rows.any():
            if keys is None:
                keys = hash_rows([table["image_uri"], table["image_version"]])
            done[rows] = member(keys[rows], index.done_keys())
        if listing.manifest:  # absent from a manifest is not gone
            continue
        if listed is None:
            listed = hash_rows([table["image_uri"]])
            listed.sort()  # in place (`member` needs it sorted)
        missing = index.missing(listed, prefix)
        if missing.num_rows:
            rows_gone = gone_rows(missing, pa.array([], pa.string()), prefix, model_id, run_id)
            # Its route by the same rules; else (a folder routed elsewhere now) the model's first.
            found = router.codes(rows_gone["image_uri"])
            names = [routes[c if c in route_codes else route_codes[0]].name for c in found]
            at = RESULT_SCHEMA.get_field_index("route")
            gone.append(rows_gone.set_column(at, "route", pa.array(names, pa.string())))
    gone_table = pa.concat_tables(gone)
    log.info(
        "listed %d images in %s: %d route(s), %d model(s); %d already scored; %d to score",
        table.num_rows, input_uri, len(routes), len(models), int(done.sum()),
        table.num_rows - int(done.sum()),
    )  # fmt: skip
    return _FleetPlan(listing, routes, codes, models, done, gone_table)


class _RouteWriter(PartWriter):
    """A PartWriter that also counts each route's rows by status and keeps its scores (each
    route's drift)."""

    def __init__(self, output: str, run_id: str, rows_per_file: int) -> None:
        super().__init__(output, run_id, rows_per_file, model_ids=True)
        self.counts: dict[str | None, Counter] = {}
        self.route_scores: dict[str | None, list[np.ndarray]] = {}

    def write(self, table: pa.Table) -> None:
        super().write(table)
        routes = table["route"]
        for route in pc.unique(routes).to_pylist():
            mine = (
                pc.is_null(routes)
                if route is None
                else pc.fill_null(pc.equal(routes, route), False)
            )
            rows = table.filter(mine)
            self.counts.setdefault(route, Counter()).update(rows["status"].to_pylist())
            ok = rows.filter(pc.equal(rows["status"], "ok"))["score"]
            scores = ok.to_numpy(zero_copy_only=False).astype(np.float32)
            self.route_scores.setdefault(route, []).append(scores)

    def scores_of(self, route: str | None) -> np.ndarray:
        found = self.route_scores.get(route)
        return np.concatenate(found) if found else np.zeros(0, np.float32)


def _error_rows(rows: pa.Table, why: str, route: str | None, run_id: str) -> pa.Table:
    """RESULT_SCHEMA error rows, retryable, for listed images no model scores tonight (a file
    the listing refused keeps its own reason, not retryable)."""
    n = rows.num_rows
    columns = {name: pa.nulls(n, RESULT_SCHEMA.field(name).type) for name in RESULT_SCHEMA.names}
    refused = rows["listing_error"]
    sizes = rows["image_bytes"]
    columns |= {
        "image_uri": rows["image_uri"].combine_chunks(),
        "image_version": rows["image_version"].combine_chunks(),
        "image_bytes": pc.if_else(pc.less(sizes, 0), pa.scalar(None, pa.int64()), sizes),
        "route": pa.array([route] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "scored_at": pa.array([utc_now()] * n, RESULT_SCHEMA.field("scored_at").type),
        "status": pa.array(["error"] * n, pa.string()),
        "error": pc.fill_null(refused, why),
        "retryable": pc.is_null(refused),
    }
    return pa.table(columns, schema=RESULT_SCHEMA)


def score_fleet(
    input_uri: str,
    routing: Routing,
    output: str,
    options: ScoringOptions | None = None,
    address: str | None = None,
) -> RunSummary:
    """Score every image under `input_uri` (or in the manifest it names) with its route's model,
    each skipping what it already scored; commit one run for them all. Returns the run's
    summary, with one `RouteSummary` per route (also in the manifest)."""
    from dskd_ray.model.checkpoint import library_versions, load_checkpoint

    options = options or ScoringOptions()
    options.validate()  # before Ray starts, not inside an actor
    check_schemes({uri_scheme(input_uri)}, options.schemes, f"INPUT {input_uri}")
    check_output(input_uri, output)
    check_writable(output)  # before a night of scoring, not after it
    start = time.perf_counter()
    started_at = utc_now()
    run_id = options.run_id or new_run_id()

    plan = _plan_fleet(input_uri, output, routing, run_id, options)
    table, codes, routes = plan.listing.table, plan.codes, plan.routes
    stats = plan.listing.stats
    writer = _RouteWriter(output, run_id, options.rows_per_file)
    if plan.gone.num_rows:
        log.info("%d image(s) listed by an earlier run are no longer under %s",
                 plan.gone.num_rows, input_uri)  # fmt: skip
        writer.write(plan.gone)
    todo = ~plan.done
    expected = int(todo.sum())
    problems: dict[int, str] = {}
    for code in range(len(routes)):
        if plan.problem(code):
            problems[code] = plan.problem(code)
    # Each usable model's routes with images left to score, in the routes' order: the blocks go
    # model by model. (Its rows' mask is made when it is loaded: one mask at a time.)
    left_per_route = np.bincount(codes[todo], minlength=len(routes))
    waiting: dict[str, list[int]] = {}
    for code in range(len(routes)):
        model = plan.model(code)
        if code not in problems and model is not None and left_per_route[code]:
            waiting.setdefault(model.uri, []).append(code)

    backends: dict[str, str] = {}  # model URI → the backend that scored it
    thresholds: dict[str, Threshold | None] = {}
    progress = None
    with _run_failure(run_id):
        total = int(sum(left_per_route[c] for mine in waiting.values() for c in mine))
        specs, blocks = [], []
        engine = _engine(total, options, address) if total else None
        for uri, route_codes in waiting.items():
            model = plan.models[uri]
            rows = todo & np.isin(codes, route_codes)
            try:  # one model at a time: the driver holds one checkpoint, the store keeps them
                checkpoint = load_checkpoint(uri)
                checkpoint.require_finished(uri)
                if checkpoint.model_id != model.model_id:
                    raise CheckpointError(
                        f"{uri} changed while the night was planned (its id was "
                        f"{model.model_id}, it is {checkpoint.model_id}): its images are "
                        "scored by the next run"
                    )
                assert engine is not None
                spec, backends[uri] = model_spec(
                    checkpoint, int(rows.sum()), options, engine, source=uri
                )
                thresholds[uri] = checkpoint.threshold
                del checkpoint
            except Exception as e:  # noqa: BLE001 - one bad model never fails the night
                why = str(e) if isinstance(e, DSKDError) else f"{type(e).__name__}: {e}"
                log.warning("route model %s cannot be used: %s", uri, why)
                model.problem = why
                for code, route in enumerate(routes):
                    if route.model == uri:
                        problems[code] = f"{UNUSABLE}: {why}"
                continue
            key = len(specs)
            specs.append(spec)
            log.info("model %s (%s): %d images, %s", model.model_id, uri, int(rows.sum()),
                     backends[uri])  # fmt: skip
            mine = table.filter(pa.array(rows))
            mine = mine.append_column("model_key", pa.array(np.full(mine.num_rows, key, np.int32)))
            mine = mine.append_column("route_code", pa.array(codes[rows].astype(np.int32)))
            blocks += [
                mine.slice(i, options.batch_size)
                for i in range(0, mine.num_rows, options.batch_size)
            ]
        for code, why in problems.items():
            rows = todo & (codes == code)
            if rows.any():
                writer.write(_error_rows(table.filter(pa.array(rows)), why, routes[code].name,
                                         run_id))  # fmt: skip
        listed_count = table.num_rows
        route_listed = np.bincount(codes, minlength=len(routes))
        route_skipped = np.bincount(codes[plan.done], minlength=len(routes))
        plan.listing.table = table = pa.table({})  # the driver keeps only the blocks
        if blocks:
            images = sum(b.num_rows for b in blocks)
            names = tuple(r.name for r in routes)
            run = _RunInput(blocks, images, tuple(specs), output, run_id, options, writer, names)
            del blocks
            assert engine is not None
            progress = run_stages(run, engine)
    files = writer.close()

    route_summaries = []
    for codes_of, route in _by_name(routes):
        model = plan.model(codes_of[0])
        counts = writer.counts.get(route.name, Counter())
        listed = int(route_listed[codes_of].sum())
        if not (listed or counts):
            continue
        problem = next((problems[c] for c in codes_of if c in problems), "")
        usable = model is not None and not model.problem and not problem
        summary_route = RouteSummary(
            route=route.name, model=route.model,
            model_id=model.model_id if usable and model is not None else None,
            listed=listed, skipped=int(route_skipped[codes_of].sum()),
            scored=counts.get("ok", 0), errors=counts.get("error", 0), gone=counts.get("gone", 0),
            backend=backends.get(route.model or "", "") if usable else "", problem=problem,
        )  # fmt: skip
        if usable and route.model in thresholds:
            scores = writer.scores_of(route.name)
            drift = run_drift(f"{run_id} route {route.name}", scores, thresholds[route.model])
            summary_route.drift = drift.to_dict()
        route_summaries.append(summary_route)

    scored = sum(r.scored for r in route_summaries)
    errors = sum(r.errors for r in route_summaries)
    if scored + errors != expected:  # never commit a run that lost rows
        raise ScoringRunError(
            f"run {run_id} wrote {scored + errors} rows for {expected} images; not committing "
            "it (its images are scored again by the next run)"
        )
    pipeline_s = startup_s = 0.0
    startup_rows = 0
    if progress is not None:
        pipeline_s = time.perf_counter() - progress.start
        startup_s = (progress.first_rows_at or progress.start) - progress.start
        startup_rows = progress.first_rows
    summary = RunSummary(
        run_id=run_id, model_id=None, listed=listed_count, skipped=int(plan.done.sum()),
        scored=scored, errors=errors, other_files=stats.other_files, seconds=0.0,
        symlinks=stats.symlinks, symlinks_skipped=stats.symlinks_skipped,
        gone=plan.gone.num_rows, pipeline_seconds=pipeline_s, startup_seconds=startup_s,
        startup_rows=startup_rows, backend="+".join(sorted(set(backends.values()))),
        partition=join_uri(output, run_partition(run_id)), routes=route_summaries,
    )  # fmt: skip
    summary.seconds = time.perf_counter() - start
    summary.manifest = join_uri(output, manifest_path(run_id))
    ids = sorted({m.model_id for m in plan.models.values() if m.model_id})
    commit_run(
        output,
        run_id,
        files,
        model_id=None,
        model_ids=ids,
        model=routing.describe(),
        input=input_uri,
        started_at=started_at.isoformat(),
        finished_at=utc_now().isoformat(),
        summary={
            **{k: v for k, v in asdict(summary).items() if k != "routes"},
            "images_per_s": summary.images_per_s,
            "steady_images_per_s": summary.steady_images_per_s,
        },
        options={
            **asdict(options),
            "backend": summary.backend or None,
            "backend_asked": options.backend,
        },  # fmt: skip
        versions=library_versions(),
        drift=None,  # each route's, in `routes`
        routes=[asdict(r) for r in route_summaries],
    )
    # Each model's index after the manifest (it only ever holds committed rows), reading only
    # the parts that hold its rows.
    written = set()
    for model in plan.models.values():
        if model.index is None or model.model_id in written:
            continue
        written.add(model.model_id)
        try:
            model.index.write(run_id, files)
        except Exception as e:  # noqa: BLE001 - the run is committed: a stale index costs time
            log.warning("run %s is committed, but the index of model %s was not written (%s): "
                        "the next run reads this run's parts instead", run_id, model.model_id,
                        e)  # fmt: skip
    log.info("%s", summary.format())
    return summary


def _by_name(routes: list[Route]) -> list[tuple[np.ndarray, Route]]:
    """The routes by name, in order, each with its codes: rows name their route, so entries
    that share a name (the images in no route, for more than one reason) are counted as one."""
    names: dict[str | None, list[int]] = {}
    for code, route in enumerate(routes):
        names.setdefault(route.name, []).append(code)
    return [(np.array(codes, np.int64), routes[codes[0]]) for codes in names.values()]


# --- the dry run ----------------------------------------------------------------------------


@dataclass
class FleetDryRun:
    """What `score_fleet` would do tonight; nothing was read, scored or written."""

    listed: int
    listed_bytes: int
    skipped: int
    to_score: int
    to_score_bytes: int
    unknown_bytes: int
    without_model: int  # images that would get an error row: no usable model
    gone: int
    other_files: int
    seconds: float
    listing_seconds: float
    routes: list[RouteSummary] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"dry run: listed {self.listed} ({_bytes(self.listed_bytes)}) in "
            f"{sum(r.route is not None for r in self.routes)} route(s), skipped {self.skipped} "
            f"(already scored), to score {self.to_score} "
            f"({_sized(self.to_score_bytes, self.unknown_bytes)}), without a usable model "
            f"{self.without_model}, gone {self.gone}, other files {self.other_files}; "
            f"{self.seconds:.1f} s (listing and diff {self.listing_seconds:.1f} s); nothing "
            "scored or written"
        ]
        for r in self.routes:
            head = f"  route {r.name}: listed {r.listed}"
            if r.problem:
                lines.append(
                    printable(
                        f"{head}: {r.problem}; its images would be error rows, tried "
                        "again next night"
                    )  # fmt: skip
                )
                continue
            lines.append(
                printable(
                    f"{head}, skipped {r.skipped}, to score {r.to_score} "
                    f"({_sized(r.to_score_bytes, r.unknown_bytes)}), gone {r.gone}; model "
                    f"{r.model} ({r.model_id})"
                )
            )
        return "\n".join(lines)

    @property
    def problems(self) -> list[RouteSummary]:
        return [r for r in self.routes if r.problem]


def dry_run_fleet(
    input_uri: str, routing: Routing, output: str, options: ScoringOptions | None = None
) -> FleetDryRun:
    """List, route, check every model's header, diff each route against what its model already
    scored, and count; score and write nothing (no torch: ids come from the headers)."""
    options = options or ScoringOptions()
    options.validate()
    check_schemes({uri_scheme(input_uri)}, options.schemes, f"INPUT {input_uri}")
    check_output(input_uri, output)
    check_writable(output)
    start = time.perf_counter()
    plan = _plan_fleet(input_uri, output, routing, "dry-run", options)
    listing_s = time.perf_counter() - start
    table, codes, routes = plan.listing.table, plan.codes, plan.routes
    sizes = table["image_bytes"].to_numpy(zero_copy_only=False)
    gone_routes = Counter(plan.gone["route"].to_pylist())
    summaries = []
    totals = Counter()
    for codes_of, route in _by_name(routes):
        mine = np.isin(codes, codes_of)
        gone = gone_routes.pop(route.name, 0)
        if not mine.any() and not gone:
            continue
        model = plan.model(int(codes_of[0]))
        problem = next((plan.problem(int(c)) for c in codes_of if plan.problem(int(c))), "")
        left = mine & ~plan.done
        known = left & (sizes >= 0)
        r = RouteSummary(
            route=route.name, model=route.model,
            model_id=None if problem or model is None else model.model_id,
            listed=int(mine.sum()), skipped=int((mine & plan.done).sum()), gone=gone,
            problem=problem,
        )  # fmt: skip
        if problem:
            totals["without_model"] += int(left.sum())
        else:
            r.to_score = int(left.sum())
            r.to_score_bytes = int(sizes[known].sum())
            r.unknown_bytes = int((left & (sizes < 0)).sum())
        summaries.append(r)
    return FleetDryRun(
        listed=table.num_rows,
        listed_bytes=int(np.maximum(sizes, 0).sum()),
        skipped=int(plan.done.sum()),
        to_score=sum(r.to_score for r in summaries),
        to_score_bytes=sum(r.to_score_bytes for r in summaries),
        unknown_bytes=sum(r.unknown_bytes for r in summaries),
        without_model=totals["without_model"],
        gone=plan.gone.num_rows,
        other_files=plan.listing.stats.other_files,
        seconds=time.perf_counter() - start,
        listing_seconds=listing_s,
        routes=summaries,
    )
