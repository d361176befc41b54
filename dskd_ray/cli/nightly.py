"""The nightly commands: score (every image under a prefix, on Ray Data) and results (what the
committed runs found)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dskd_ray.cli.console import echo, setup_logging
from dskd_ray.cli.options import SCORING, Verbose, device_option, given, opt
from dskd_ray.config import (
    MAX_BATCH_SIZE,
    MAX_IN_PROCESS,
    MAX_MODELS_PER_ACTOR,
    MAX_ROWS_PER_FILE,
    MAX_THREADS,
    MAX_TOP,
    MAX_WORKERS,
    ScoringOptions,
)
from dskd_ray.errors import DSKDError


def score(
    input_uri: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help="Folder or s3:// prefix of images, searched recursively; or a manifest "
            "(.parquet or .csv with column image_uri, optionally image_version, image_bytes)",
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Output folder or s3:// prefix (results/, maps/, _manifests/)"
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Checkpoint (local or s3://) that scores every image"),
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(
            "--models",
            metavar="MODELS",
            help="Folder or s3:// prefix of <route>.pt: an image under INPUT/<route>/ is scored "
            "by MODELS/<route>.pt, all routes in one run (a manifest INPUT: by its model column)",
        ),
    ] = None,
    routes: Annotated[
        str | None,
        typer.Option(
            "--routes",
            metavar="FILE",
            help="CSV (pattern,model[,route]) or YAML (pattern: model): the first pattern (a path "
            "under INPUT or a URI; * ** ? [..]) that matches an image gives its model; model "
            "names are looked up in --models",
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to run on; default RAY_ADDRESS, else a new local Ray"),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            callback=device_option, help="auto (GPU actors where the cluster has GPUs) | cpu | cuda"
        ),
    ] = "auto",
    batch_size: Annotated[
        int | None, opt(SCORING.batch_size, min=1, max=MAX_BATCH_SIZE, help="Images per model call")
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(
            min=1, max=MAX_WORKERS, help="Most scoring actors; default from the cluster's CPUs/GPUs"
        ),
    ] = None,
    actor_threads: Annotated[
        int | None,
        typer.Option(
            min=1, max=MAX_THREADS, help="Torch threads per CPU actor; default from the cluster"
        ),
    ] = None,
    rescore: Annotated[
        bool, typer.Option(help="Score every image again, even those this model already scored")
    ] = False,
    rows_per_file: Annotated[
        int | None,
        opt(SCORING.rows_per_file, min=1, max=MAX_ROWS_PER_FILE, help="Parquet rows per part file"),
    ] = None,
    precision: Annotated[
        str | None,
        opt(
            SCORING.precision,
            help="fp32 | bf16 (autocast: GPUs and CPUs with native bf16; ~1e-2 on scores)",
        ),
    ] = None,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the model in each actor")
    ] = False,
    backend: Annotated[
        str | None,
        opt(
            SCORING.backend,
            help="auto | torch | onnxruntime (the checkpoint's exported graph on CPU actors; "
            "pip install 'dskd_ray[onnx]'). auto: onnxruntime on CPU actors when installed and "
            f"the graph is cached or the run has {SCORING.onnx_export_min}+ images, else torch",
        ),
    ] = None,
    in_process_max: Annotated[
        int | None,
        opt(
            SCORING.in_process_max,
            min=0,
            max=MAX_IN_PROCESS,
            help="Score up to this many images in this process when no Ray cluster is named "
            "or running (0: always on Ray)",
        ),
    ] = None,
    models_per_actor: Annotated[
        int | None,
        opt(
            SCORING.models_per_actor,
            min=1,
            max=MAX_MODELS_PER_ACTOR,
            help="With --models/--routes: models each scoring actor keeps loaded",
        ),
    ] = None,
    allow_scheme: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SCHEME",
            help="Also read this URI scheme in INPUT or a manifest (gs, az, http…; its fsspec "
            "filesystem installed on every node; repeat for several). Without it only local "
            "paths, file:// and s3:// are read",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="List and compare with what is done; print counts; score nothing"
        ),
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Score every image under INPUT on Ray Data: one anomaly map and one Parquet row per image.

    Incremental: images this model already scored (same URI and version) are skipped. A run is
    visible to readers only once its manifest is written, last. A manifest INPUT scores exactly
    the images it lists (without image_version, each URI is scored once).

    One model (--model) scores every image; or each image is scored by its route's model
    (--models, --routes), every route in one run and one commit.
    """
    setup_logging(verbose)
    if model is None and models is None and routes is None:
        raise typer.BadParameter(
            "give --model (one checkpoint for every image), or --models / --routes (a model per "
            "route)",
            param_hint="--model",
        )
    if model is not None and (models is not None or routes is not None):
        raise typer.BadParameter(
            "--model scores every image with one checkpoint: give it, or --models / --routes",
            param_hint="--model",
        )
    from dskd_ray.nightly.plan import dry_run as plan_only
    from dskd_ray.nightly.run import score_images

    options = ScoringOptions(**given(
        device=device, batch_size=batch_size, actors=actors, actor_threads=actor_threads,
        rescore=rescore, rows_per_file=rows_per_file, precision=precision, compile=compile,
        backend=backend,
        in_process_max=in_process_max,
        schemes=tuple(s.lower() for s in allow_scheme) if allow_scheme else None,
        models_per_actor=models_per_actor,
    ))  # fmt: skip
    if model is None:
        _score_routes(input_uri, models, routes, out, options, address, dry_run)
        return
    if dry_run:
        echo(plan_only(input_uri, model, out, options).format())
        return
    summary = score_images(input_uri, model, out, options, address=address)
    echo(
        f"listed {summary.listed}, scored {summary.scored}, errors {summary.errors}, "
        f"skipped {summary.skipped} (already scored); {summary.images_per_s:.1f} images/s"
        f"{summary.format_backend()}; {summary.seconds:.1f} s in all"
    )
    if summary.errors:
        echo(f"{summary.errors} image(s) could not be scored: rows with status = 'error' say why")
    if summary.gone:
        echo(
            f"{summary.gone} image(s) listed by an earlier run are gone from INPUT: rows with "
            "status 'gone'"
        )
    if summary.symlinks:
        echo(summary.format_symlinks())
    echo(f"run {summary.run_id}: {summary.partition}")
    echo(f"committed: {summary.manifest}")


def _score_routes(
    input_uri: str,
    models: str | None,
    routes: str | None,
    out: str,
    options: ScoringOptions,
    address: str | None,
    dry_run: bool,
) -> None:
    """`dskd score --models / --routes`: every route's images, each by its own model, one run."""
    from dskd_ray.io.storage import printable
    from dskd_ray.nightly.fleet import dry_run_fleet, score_fleet
    from dskd_ray.nightly.routes import Routing, read_routes

    routing = read_routes(routes, models) if routes is not None else Routing(models=models)
    if dry_run:
        plan = dry_run_fleet(input_uri, routing, out, options)
        echo(plan.format())
        for r in plan.problems:
            typer.echo(f"dskd: warning: route {r.name}: {printable(r.problem)}", err=True)
        return
    summary = score_fleet(input_uri, routing, out, options, address=address)
    echo(
        f"listed {summary.listed} in {sum(r.route is not None for r in summary.routes)} "
        f"route(s), scored {summary.scored}, errors {summary.errors}, skipped {summary.skipped} "
        f"(already scored); {summary.images_per_s:.1f} images/s{summary.format_backend()}; "
        f"{summary.seconds:.1f} s in all"
    )
    for r in summary.routes:
        line = f"  route {r.name}: listed {r.listed}, scored {r.scored}, errors {r.errors}, "
        line += f"skipped {r.skipped}, gone {r.gone}"
        echo(printable(line + (f"; {r.problem}" if r.problem else f"; model {r.model_id}")))
    for r in summary.routes:
        if r.problem:
            typer.echo(
                f"dskd: warning: route {r.name}: {printable(r.problem)} ({r.errors} error rows, "
                "tried again next night)",
                err=True,
            )
    if summary.errors:
        echo(f"{summary.errors} image(s) could not be scored: rows with status = 'error' say why")
    if summary.gone:
        echo(
            f"{summary.gone} image(s) listed by an earlier run are gone from INPUT: rows with "
            "status 'gone'"
        )
    if summary.symlinks:
        echo(summary.format_symlinks())
    echo(f"run {summary.run_id}: {summary.partition}")
    echo(f"committed: {summary.manifest}")


def day_option(value: str | None) -> Any:
    """--since checked as it is parsed: a bad date is a usage error, not a traceback."""
    if value is None:
        return None
    from dskd_ray.nightly.summary import parse_day

    try:
        return parse_day(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from None


GALLERY_TOP = 24  # images in --report when --top is not given


def results(
    output: Annotated[
        str, typer.Argument(metavar="OUTPUT", help="What `dskd score --out` wrote to (or s3://)")
    ],
    run: Annotated[str | None, typer.Option("--run", help="Only this run id")] = None,
    route: Annotated[
        str | None,
        typer.Option(
            "--route", help="Only this route (of runs of several models: `dskd score --models`)"
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            callback=day_option,
            metavar="DATE",
            help="Only runs started on DATE (YYYY-MM-DD, UTC) or later",
        ),
    ] = None,
    top: Annotated[
        int,
        typer.Option(
            min=0, max=MAX_TOP, help="Also list the N most anomalous images of the chosen runs"
        ),
    ] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON: runs and top images")
    ] = False,
    as_csv: Annotated[
        bool, typer.Option("--csv", help="Print CSV: the runs, or with --top the top images")
    ] = False,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Write an HTML gallery here: the top images of a run (--run, else the latest "
            f"with rows) with their maps, its score histogram and its errors (--top, default "
            f"{GALLERY_TOP}); a section per route for a run of several models",
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """What the committed scoring runs under OUTPUT found: per run the images listed, scored and
    failed (by reason), how many were anomalous, score quantiles, and the drift of the night's
    scores from calibration (a warning when the bulk moved far). A run of several models
    (`dskd score --models`) has these per route. Uncommitted runs are never read.
    """
    setup_logging(verbose)
    from dskd_ray.io.storage import printable
    from dskd_ray.nightly.summary import format_runs, format_top, runs_csv, summarize_runs, top_csv

    if as_json and as_csv:
        raise typer.BadParameter("choose one of --json and --csv", param_hint="--json/--csv")
    if report is not None:  # before the table, not after it
        from dskd_ray.reporting.html import prepare_report_dir

        prepare_report_dir(report, not_inside=output)
    summary = summarize_runs(output, run=run, since=since, top=top, route=route)
    for figures in summary.runs:
        if figures.drift_warning:
            typer.echo(
                f"dskd: warning: run {printable(figures.where)}: {figures.drift_warning}", err=True
            )
    if as_json:
        typer.echo(summary.to_json(), nl=False)
    elif as_csv:
        typer.echo(top_csv(summary) if top else runs_csv(summary), nl=False)
    else:
        echo(format_runs(summary))
        if top:
            echo("")
            echo(format_top(summary))
    if report is not None:
        from dskd_ray.nightly.gallery import write_gallery

        path = write_gallery(
            output, report, run=run, top=top or GALLERY_TOP, since=since, route=route
        )
        echo(f"report: {path}")
    damaged = [r.damaged for r in summary.runs if r.damaged]
    if damaged:  # the other runs are listed above; the exit code still says something is wrong
        more = f" (and {len(damaged) - 1} more damaged run(s), listed above)" if damaged[1:] else ""
        raise DSKDError(damaged[0] + more)
