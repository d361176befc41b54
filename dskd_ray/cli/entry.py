"""The `dskd` command: make demo data, train, evaluate, predict, and the one-shot demo."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer ≥ 0.2x vendors click; older ones use the click package
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

from dskd_ray.config import (
    BACKBONES,
    DEMO_CONFIG,
    MAX_IMAGE_SIZE,
    DSKDConfig,
    RayOptions,
    ScoringOptions,
    check_device,
)
from dskd_ray.errors import ConfigError, DSKDError
from dskd_ray.progress import PROGRESS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="DSKD anomaly detection: learn normal from defect-free images, find the defects.",
)
log = logging.getLogger("dskd_ray")

DEFAULTS = DSKDConfig()  # the config owns its defaults; options default to None and show them
SCORING = ScoringOptions()
BACKBONE_HELP = " | ".join(BACKBONES)
WEIGHTS_HELP = "imagenet | path or s3:// URI to a state dict"
DEVICE_HELP = "auto | cpu | cuda | cuda:N"
STUDENTS_HELP = "both (DSKD) | se (≈STFPM) | sd (≈RD) | none (with --memory knn)"
MEMORY_HELP = (
    "knn: add the teacher's memory, nearest-neighbour distances to normal patches "
    "(PatchCore-style), to the map | none"
)

# Set by each command's --verbose: `main` then shows the traceback behind a one-line error.
_verbose = False


def _device(value: str) -> str:
    """--device checked as it is parsed: before data is read or Ray starts."""
    try:
        return check_device(value)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from e


def _setup_logging(verbose: bool = False) -> None:
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="dskd: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("dskd_ray").setLevel(logging.INFO if verbose else logging.WARNING)
    # Progress lines (an epoch, every ~10 s of scoring, a chunk of evaluation): to stdout when it
    # is not a terminal, so a redirected run leaves a log (a terminal has the bar); to stderr
    # with the rest under --verbose.
    progress = logging.getLogger(PROGRESS.name)
    for handler in [h for h in progress.handlers if getattr(h, "dskd_stdout", False)]:
        progress.removeHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = verbose
    if not sys.stdout.isatty():
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.dskd_stdout = True  # type: ignore[attr-defined]
        progress.addHandler(handler)


def _echo(msg: str = "") -> None:
    typer.echo(msg)


def _shown(value: object) -> str:
    """A default as the help shows it: 0.005, 0 (not 0.0), resnet18."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _opt(default: object, **options: Any) -> Any:
    """A typer.Option that defaults to None (its owner's default applies) and shows `default`."""
    # Written into the help, not passed as show_default: click prints a string default as
    # "[default: (50)]".
    text = options.pop("help", "")
    return typer.Option(show_default=False, help=f"{text}  [default: {_shown(default)}]", **options)


def _field_default(cls: type, name: str) -> str:
    """The default of a dataclass field, as the help shows it (the class owns it)."""
    return _shown(next(f.default for f in dataclasses.fields(cls) if f.name == name))


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave: the ones left None take their owner's default."""
    return {k: v for k, v in options.items() if v is not None}


class _ProgressBar:
    """A rich progress bar for training: epoch, loss and images/s."""

    def __init__(self, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn(f"[bold]{label}[/] epoch {{task.fields[epoch]}}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = None

    def __enter__(self) -> _ProgressBar:
        return self  # the bar starts with the first step: a run that fails first prints none

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.__exit__(*exc)

    def __call__(self, p: object) -> None:
        total = p.steps * p.epochs  # type: ignore[attr-defined]
        done = (p.epoch - 1) * p.steps + p.step  # type: ignore[attr-defined]
        fields = {
            "epoch": f"{p.epoch}/{p.epochs}",  # type: ignore[attr-defined]
            "loss": f"{p.loss:.4f}",  # type: ignore[attr-defined]
            "ips": f"{p.images_per_s:.1f}",  # type: ignore[attr-defined]
        }
        if self.task is None:
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=total, **fields)
        self.progress.update(self.task, completed=done, total=total, **fields)


@app.command("make-demo-data")
def make_demo_data_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder to write the data set into")],
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same files")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace existing category folders")] = False,
    category: Annotated[
        list[str] | None,
        typer.Option(help="Only this category (repeat for several; default: all three)"),
    ] = None,
    image_size: Annotated[int, typer.Option(min=32, help="Side of every image, in pixels")] = 256,
    defect_window: Annotated[
        int | None,
        typer.Option(
            min=32,
            help="Paint each defect as if the image were this wide, in a window of it: "
            "small defects on large images (woven, brushed_metal)",
        ),
    ] = None,
) -> None:
    """Write the built-in procedurally generated demo data set (MVTec AD layout)."""
    from dskd_ray.demo.data import make_demo_data

    made = make_demo_data(
        directory,
        categories=category or None,
        seed=seed,
        overwrite=overwrite,
        image_size=image_size,
        defect_window=defect_window,
    )
    for name, path in made.items():
        _echo(f"{name}: {path}")


@app.command()
def train(
    data: Annotated[
        str,
        typer.Argument(help="MVTec category folder or folder of normal images (local or s3://)"),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Checkpoint to write (local or s3://)")],
    epochs: Annotated[int | None, _opt(DEFAULTS.epochs, min=1, help="Training epochs")] = None,
    batch_size: Annotated[
        int | None,
        _opt(
            DEFAULTS.batch_size,
            min=1,
            help="Images per step; with --workers, the global batch split over them",
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        _opt(
            DEFAULTS.image_size,
            min=64,
            max=MAX_IMAGE_SIZE,
            help="Square input size, a multiple of 32",
        ),
    ] = None,
    tile: Annotated[
        int | None,
        typer.Option(
            min=64,
            max=MAX_IMAGE_SIZE,
            help="Cut images into SIZE×SIZE tiles at full resolution instead of shrinking "
            "them to --image-size (small defects on large images); a multiple of 32",
        ),
    ] = None,
    tile_overlap: Annotated[
        int | None,
        _opt(DEFAULTS.tile_overlap, min=0, help="With --tile: pixels neighbouring tiles share"),
    ] = None,
    backbone: Annotated[str | None, _opt(DEFAULTS.backbone, help=BACKBONE_HELP)] = None,
    teacher_weights: Annotated[
        str | None, _opt(DEFAULTS.teacher_weights, help=WEIGHTS_HELP)
    ] = None,
    students: Annotated[str | None, _opt(DEFAULTS.students, help=STUDENTS_HELP)] = None,
    memory: Annotated[str | None, _opt(DEFAULTS.memory, help=MEMORY_HELP)] = None,
    memory_size: Annotated[
        int | None,
        _opt(
            DEFAULTS.memory_size,
            min=1,
            help="With --memory knn: patches in the bank, at most (the scoring cost)",
        ),
    ] = None,
    memory_sampling: Annotated[
        str | None,
        _opt(
            DEFAULTS.memory_sampling,
            help="With --memory knn: how the bank is picked: coreset | random",
        ),
    ] = None,
    memory_weight: Annotated[
        float | None,
        _opt(
            DEFAULTS.memory_weight,
            min=0.0,
            max=1.0,
            help="With --memory knn and students: the memory's share of the map",
        ),
    ] = None,
    df_input: Annotated[
        str | None, _opt(DEFAULTS.df_input, help="What feeds the DF embedding: se | teacher")
    ] = None,
    level_fusion: Annotated[
        str | None, _opt(DEFAULTS.level_fusion, help="Combine levels by: sum | product")
    ] = None,
    level_normalization: Annotated[
        str | None,
        _opt(
            DEFAULTS.level_normalization,
            help="Put each level map on a common scale first, from held-out normal images: "
            "none | mean (÷ its mean) | standardize (÷ its std)",
        ),
    ] = None,
    map_baseline: Annotated[
        str | None,
        _opt(
            DEFAULTS.map_baseline,
            help="The map's per-pixel mean on normal images: subtract it (cut at zero) | "
            "mean (divide by it) | none",
        ),
    ] = None,
    score_top_k: Annotated[
        int | None,
        _opt(
            DEFAULTS.score_top_k,
            min=1,
            help="Image score: mean of the K highest map pixels (1: the max)",
        ),
    ] = None,
    denoise: Annotated[
        float | None,
        _opt(
            DEFAULTS.denoise,
            min=0.0,
            max=1.0,
            help="Share of each batch given synthetic defects (made from the training images) "
            "that the students learn to ignore: 0 (off) to 1",
        ),
    ] = None,
    pyramid: Annotated[
        str | None,
        _opt(
            DEFAULTS.pyramid,
            help="Teacher levels distilled, by stride: 4-8-16 | 8-16-32 (the trunk runs on to "
            "stride 32)",
        ),
    ] = None,
    encoder_student: Annotated[
        str | None,
        _opt(
            DEFAULTS.encoder_student,
            help="The encoder student: teacher (a fresh copy of its trunk) | resnet (a fresh "
            "ResNet18-style network read out to the teacher's channels)",
        ),
    ] = None,
    feature_norm: Annotated[
        str | None,
        _opt(
            DEFAULTS.feature_norm,
            help="Compare features as they are (none) or with each teacher channel standardised "
            "by its training-image mean and std (standardize), in the loss and the map",
        ),
    ] = None,
    distance: Annotated[
        str | None,
        _opt(
            DEFAULTS.distance,
            help="Teacher-student distance per position: cosine | l2 (mean squared difference)",
        ),
    ] = None,
    optimizer: Annotated[
        str | None, _opt(DEFAULTS.optimizer, help="adam | sgd (momentum 0.9; STFPM: --lr 0.4)")
    ] = None,
    lr: Annotated[float | None, _opt(DEFAULTS.lr, min=0.0, help="Learning rate (> 0)")] = None,
    weight_decay: Annotated[
        float | None, _opt(DEFAULTS.weight_decay, min=0.0, help="The optimiser's weight decay")
    ] = None,
    lr_schedule: Annotated[str | None, _opt(DEFAULTS.lr_schedule, help="constant | cosine")] = None,
    loss_form: Annotated[
        str | None,
        _opt(
            DEFAULTS.loss_form,
            help="Loss per level: pixel (mean of per-position 1 − cos) | flat (1 − cos of each "
            "image's whole level map, as Reverse Distillation)",
        ),
    ] = None,
    hard_mining: Annotated[
        float | None,
        _opt(
            DEFAULTS.hard_mining,
            min=0.0,
            max=1.0,
            help="Share of the easiest positions whose gradients are scaled by 0.1 (< 1)",
        ),
    ] = None,
    seed: Annotated[int | None, _opt(DEFAULTS.seed, min=0, help="Random seed")] = None,
    holdout_fraction: Annotated[
        float | None,
        _opt(
            DEFAULTS.holdout_fraction,
            min=0.0,
            max=1.0,
            help="Normal images held out for the threshold (< 1)",
        ),
    ] = None,
    threshold_quantile: Annotated[
        float | None,
        _opt(
            DEFAULTS.threshold_quantile,
            min=0.0,
            max=1.0,
            help="Quantile of held-out scores used as threshold (> 0)",
        ),
    ] = None,
    device: Annotated[str, typer.Option(callback=_device, help=DEVICE_HELP)] = "auto",
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted local run from --out (Ray: --run-name)")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Train on Ray Train with N DDP workers (default: local)"),
    ] = None,
    gpus_per_worker: Annotated[
        float | None,
        _opt(
            _field_default(RayOptions, "gpus_per_worker"),
            min=0.0,
            help="Ray: GPUs per worker (0: CPU)",
        ),
    ] = None,
    cpus_per_worker: Annotated[
        int | None,
        _opt(
            _field_default(RayOptions, "cpus_per_worker"),
            min=1,
            help="Ray: CPUs (torch threads) per worker",
        ),
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray: cluster address (default: RAY_ADDRESS or local)")
    ] = None,
    storage_path: Annotated[
        str | None,
        typer.Option(help="Ray: run storage, local dir or s3:// (default ~/ray_results)"),
    ] = None,
    run_name: Annotated[
        str | None, typer.Option(help="Ray: run name; same storage + name resumes")
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        _opt(
            _field_default(RayOptions, "checkpoint_every"),
            min=1,
            help="Ray: epochs between checkpoints",
        ),
    ] = None,
    keep_checkpoints: Annotated[
        int | None,
        _opt(
            _field_default(RayOptions, "keep_checkpoints"),
            min=1,
            help="Ray: checkpoints kept in storage",
        ),
    ] = None,
    max_failures: Annotated[
        int | None,
        _opt(
            _field_default(RayOptions, "max_failures"),
            min=-1,
            help="Ray: worker-group restarts allowed (-1: no limit)",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more")] = False,
) -> None:
    """Train the students on normal images (and fit the teacher's memory, with --memory knn);
    write a checkpoint with its threshold.

    With --workers N it runs on Ray Train (DDP over the students, one image shard per worker),
    checkpoints every epoch to --storage-path/--run-name, and resumes when run again.
    """
    global _interrupt_note
    _setup_logging(verbose)
    from dskd_ray.training.loop import train as run_training

    if workers is None and (address or storage_path or run_name or gpus_per_worker):
        raise DSKDError(
            "--address, --storage-path, --run-name and --gpus-per-worker need --workers N"
        )

    if tile is not None and image_size is not None:
        raise DSKDError("--tile SIZE sets the model's input size: drop --image-size")
    if tile_overlap is not None and tile is None:
        raise DSKDError("--tile-overlap needs --tile SIZE")
    if tile is not None and tile % 32:
        raise DSKDError(f"--tile {tile} must be a multiple of 32 (the model's input size)")
    config = DSKDConfig(**_given(
        epochs=epochs, batch_size=batch_size, image_size=tile or image_size, backbone=backbone,
        tiled=True if tile else None, tile_overlap=tile_overlap,
        teacher_weights=teacher_weights, students=students, df_input=df_input, memory=memory,
        memory_size=memory_size, memory_sampling=memory_sampling, memory_weight=memory_weight,
        level_fusion=level_fusion, level_normalization=level_normalization, map_baseline=map_baseline,
        score_top_k=score_top_k, lr=lr, lr_schedule=lr_schedule, seed=seed,
        loss_form=loss_form, hard_mining=hard_mining, feature_norm=feature_norm, distance=distance,
        denoise=denoise, pyramid=pyramid, encoder_student=encoder_student, optimizer=optimizer,
        weight_decay=weight_decay,
        holdout_fraction=holdout_fraction, threshold_quantile=threshold_quantile,
    ))  # fmt: skip
    start = time.perf_counter()
    if workers is not None:
        from dskd_ray.training.distributed import train_distributed

        options = RayOptions(workers=workers, **_given(
            gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
            address=address, storage_path=storage_path, run_name=run_name,
            checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
            max_failures=max_failures,
        ))  # fmt: skip
        logging.getLogger("dskd_ray.training.distributed").setLevel(logging.INFO)
        result = train_distributed(config, data, out, options)
    else:
        from dskd_ray.model.checkpoint import checkpoint_exists

        had_out = checkpoint_exists(out) and not resume  # a file this run may not have written
        try:
            with _ProgressBar(Path(data).name or data) as bar:
                result = run_training(
                    config, data, out, device=device, resume=resume, on_progress=bar
                )
        except KeyboardInterrupt:
            if not had_out and checkpoint_exists(out):  # written after a whole epoch
                _interrupt_note = (
                    f"; {out} holds the last whole epoch: the same command with --resume goes on"
                )
            raise
    ckpt = result.checkpoint
    if result.skipped:
        _echo(f"skipped {len(result.skipped)} unreadable image(s): see the warnings above")
    threshold = f"{ckpt.threshold.value:.4f}" if ckpt.threshold else "none (no hold-out)"
    _echo(
        f"trained on {result.n_train} images ({result.n_holdout} held out) in "
        f"{time.perf_counter() - start:.0f} s; threshold {threshold}; model {ckpt.model_id}"
    )
    _echo(f"checkpoint: {out}")


def _models_for(data: str, model: str) -> list[tuple[object, str]]:
    """Pair each category under `data` with its checkpoint: a file, or DIR/<category>.pt."""
    from dskd_ray.errors import DataError
    from dskd_ray.io.data import discover_categories
    from dskd_ray.io.storage import exists, is_dir, storage_errors

    categories = discover_categories(data)
    with storage_errors(model):
        is_folder = is_dir(model)
    if is_folder:
        pairs = []
        for c in categories:
            ckpt = f"{model.rstrip('/')}/{c.name}.pt"
            with storage_errors(ckpt):
                found = exists(ckpt)
            if not found:
                raise DataError(f"no checkpoint for category {c.name!r}: expected {ckpt}")
            pairs.append((c, ckpt))
        return pairs
    if len(categories) > 1:
        raise DataError(
            f"{data} holds {len(categories)} categories but --model is one checkpoint: pass one "
            "category folder, or a --model folder with <category>.pt for each"
        )
    return [(categories[0], model)]


EVAL_BATCH = 16  # images per forward pass in `evaluate`


@app.command()
def evaluate(
    data: Annotated[str, typer.Argument(help="MVTec-layout category or root of categories")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Checkpoint, or a folder of <category>.pt")
    ],
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the metrics as JSON here")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Write an HTML report here: index.html with curves and the worst images",
        ),
    ] = None,
    device: Annotated[str, typer.Option(callback=_device, help=DEVICE_HELP)] = "auto",
    batch_size: Annotated[
        int | None, _opt(EVAL_BATCH, min=1, help="Images per forward pass")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more")] = False,
) -> None:
    """Image/pixel AUROC, AUPRO (FPR ≤ 0.3) and F1-max per category and their mean.

    With --report DIR it also writes DIR/index.html (opens from disk): the table, ROC and PRO
    curves, and overlays of the worst false positives and false negatives.
    """
    _setup_logging(verbose)
    from dskd_ray.evaluation.evaluate import evaluate_category, format_table, summarize
    from dskd_ray.inference.scoring import Scorer

    html_report = None
    if report is not None:
        from dskd_ray.evaluation.report import Report

        html_report = Report(report)
    results = []
    for category, ckpt in _models_for(data, model):
        scorer = Scorer(ckpt, device=device, batch_size=batch_size or EVAL_BATCH)
        result = evaluate_category(scorer, category, keep_maps=html_report is not None)
        if html_report is not None:
            html_report.add(result, scorer.threshold, model=f"{ckpt} ({scorer.model_id})")
            result.maps = result.masks = None  # rendered: free them before the next category
        results.append(result)
    table = summarize(results)
    _echo(format_table(table))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(table, indent=2) + "\n")
        _echo(f"metrics: {json_path}")
    if html_report is not None:
        _echo(f"report: {html_report.write(table)}")


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files (local or s3://)")],
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint (local or s3://)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for overlays and scores.csv")],
    device: Annotated[str, typer.Option(callback=_device, help=DEVICE_HELP)] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more")] = False,
) -> None:
    """Score images; write each one's overlay PNG (heat map over the image) and scores.csv."""
    _setup_logging(verbose)
    from dskd_ray.inference.predict import Prediction, predict_images

    def say(p: Prediction) -> None:
        if p.error is not None:
            typer.echo(f"dskd: error: {p.image}: {p.error}", err=True)
            return
        verdict = {None: "", True: "  ANOMALOUS", False: "  normal"}[p.is_anomalous]
        _echo(f"{p.image}: {p.score:.4f}{verdict}")

    done = predict_images(images, model, out, device=device, on_prediction=say)
    threshold = "none" if done.threshold is None else f"{done.threshold:.4f}"
    _echo(f"threshold {threshold}; overlays and scores.csv in {out}")
    if done.failures:
        raise DSKDError(
            f"{done.failures} of {len(images)} image(s) could not be scored (see scores.csv)"
        )


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the data, models and metrics go")
    ] = Path("dskd-demo"),
    epochs: Annotated[
        int | None, _opt(DEMO_CONFIG.epochs, min=1, help="Training epochs per category")
    ] = None,
    batch_size: Annotated[
        int | None, _opt(DEMO_CONFIG.batch_size, min=1, help="Images per step")
    ] = None,
    image_size: Annotated[
        int | None,
        _opt(
            DEMO_CONFIG.image_size,
            min=64,
            max=MAX_IMAGE_SIZE,
            help="Square input size, a multiple of 32",
        ),
    ] = None,
    backbone: Annotated[str | None, _opt(DEMO_CONFIG.backbone, help=BACKBONE_HELP)] = None,
    students: Annotated[str | None, _opt(DEMO_CONFIG.students, help=STUDENTS_HELP)] = None,
    memory: Annotated[str | None, _opt(DEMO_CONFIG.memory, help=MEMORY_HELP)] = None,
    device: Annotated[str, typer.Option(callback=_device, help=DEVICE_HELP)] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more")] = False,
) -> None:
    """Demo data → train one model per category → evaluate → a metrics table."""
    _setup_logging(verbose)
    from dskd_ray.demo.run import ensure_demo_data, run_demo
    from dskd_ray.evaluation.evaluate import format_table

    start = time.perf_counter()
    config = DEMO_CONFIG.replace(**_given(
        epochs=epochs, batch_size=batch_size, image_size=image_size, backbone=backbone,
        students=students, memory=memory,
    ))  # fmt: skip
    data_dir, made = ensure_demo_data(directory)
    _echo(f"demo data: {data_dir}" + ("" if made else " (already there)"))
    run = run_demo(directory, config, device=device, progress=_ProgressBar)
    _echo("")
    _echo(format_table(run.table))
    _echo("")
    _echo(f"models:  {run.models}")
    _echo(f"metrics: {run.metrics_path}")
    _echo(f"done in {time.perf_counter() - start:.0f} s")


@app.command()
def score(
    input_uri: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help="Folder or s3:// prefix of images, searched recursively; or a manifest "
            "(.parquet or .csv with column image_uri, optionally image_version, image_bytes)",
        ),
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint (local or s3://)")],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Output folder or s3:// prefix (results/, maps/, _manifests/)"
        ),
    ],
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to run on; default RAY_ADDRESS, else a new local Ray"),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            callback=_device, help="auto (GPU actors where the cluster has GPUs) | cpu | cuda"
        ),
    ] = "auto",
    batch_size: Annotated[
        int | None, _opt(SCORING.batch_size, min=1, help="Images per model call")
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(min=1, help="Most scoring actors; default from the cluster's CPUs/GPUs"),
    ] = None,
    actor_threads: Annotated[
        int | None,
        typer.Option(min=1, help="Torch threads per CPU actor; default from the cluster"),
    ] = None,
    rescore: Annotated[
        bool, typer.Option(help="Score every image again, even those this model already scored")
    ] = False,
    rows_per_file: Annotated[
        int | None, _opt(SCORING.rows_per_file, min=1, help="Parquet rows per part file")
    ] = None,
    precision: Annotated[
        str | None,
        _opt(
            SCORING.precision,
            help="fp32 | bf16 (autocast: GPUs and CPUs with native bf16; ~1e-2 on scores)",
        ),
    ] = None,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the model in each actor")
    ] = False,
    backend: Annotated[
        str | None,
        _opt(
            SCORING.backend,
            help="auto | torch | onnxruntime (the checkpoint's exported graph on CPU actors; "
            "pip install 'dskd_ray[onnx]'). auto: onnxruntime on CPU actors when installed and "
            f"the graph is cached or the run has {SCORING.onnx_export_min}+ images, else torch",
        ),
    ] = None,
    in_process_max: Annotated[
        int | None,
        _opt(
            SCORING.in_process_max,
            min=0,
            help="Score up to this many images in this process when no Ray cluster is named "
            "or running (0: always on Ray)",
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more")] = False,
) -> None:
    """Score every image under INPUT on Ray Data: one anomaly map and one Parquet row per image.

    Incremental: images this model already scored (same URI and version) are skipped. A run is
    visible to readers only once its manifest is written, last. A manifest INPUT scores exactly
    the images it lists (without image_version, each URI is scored once).
    """
    _setup_logging(verbose)
    from dskd_ray.nightly.plan import dry_run as plan_only
    from dskd_ray.nightly.run import score_images

    options = ScoringOptions(**_given(
        device=device, batch_size=batch_size, actors=actors, actor_threads=actor_threads,
        rescore=rescore, rows_per_file=rows_per_file, precision=precision, compile=compile,
        backend=backend,
        in_process_max=in_process_max,
        schemes=tuple(s.lower() for s in allow_scheme) if allow_scheme else None,
    ))  # fmt: skip
    if dry_run:
        _echo(plan_only(input_uri, model, out, options).format())
        return
    summary = score_images(input_uri, model, out, options, address=address)
    _echo(
        f"listed {summary.listed}, scored {summary.scored}, errors {summary.errors}, "
        f"skipped {summary.skipped} (already scored); {summary.images_per_s:.1f} images/s"
        f"{summary.format_backend()}; {summary.seconds:.1f} s in all"
    )
    if summary.errors:
        _echo(f"{summary.errors} image(s) could not be scored: rows with status = 'error' say why")
    if summary.gone:
        _echo(
            f"{summary.gone} image(s) listed by an earlier run are gone from INPUT: rows with "
            "status 'gone'"
        )
    if summary.symlinks:
        _echo(summary.format_symlinks())
    _echo(f"run {summary.run_id}: {summary.partition}")
    _echo(f"committed: {summary.manifest}")


@app.command()
def export(
    model: Annotated[str, typer.Argument(metavar="CKPT", help="Checkpoint (local or s3://)")],
    out: Annotated[
        str, typer.Option("--out", "-o", help="The .onnx file to write (local or s3://)")
    ],
    check_images: Annotated[
        str | None,
        typer.Option(
            help="Folder or s3:// prefix of images to check the graph on (first 16; "
            "default: 4 synthetic images)"
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace an existing --out file that is not an ONNX graph"),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more")] = False,
) -> None:
    """Export the scoring graph to ONNX: images in [0, 1] → anomaly_map and score, exactly as
    `dskd score` computes them. Checked against PyTorch before it is written; a graph that
    scores differently is never written."""
    _setup_logging(verbose)
    from dskd_ray.onnx.export import check_export_target, export_onnx

    check_export_target(model, out, force)  # before the check images are read
    images = None
    if check_images is not None:
        from dskd_ray.io.data import list_images, load_images
        from dskd_ray.model.checkpoint import load_checkpoint

        size = load_checkpoint(model).config.image_size
        images, _, _ = load_images(list_images(check_images)[:16], size)
        if not len(images):
            raise DSKDError(f"--check-images {check_images}: no readable images there")
    result = export_onnx(model, out, images, force=force)
    meta = result.metadata
    _echo(
        f"wrote {out}: model {meta['dskd_ray.model_id']}, {meta['dskd_ray.image_size']}² input, "
        f"threshold {meta['dskd_ray.threshold']}"
    )
    _echo(f"checked against PyTorch on {result.check.format()}")
    if json.loads(meta["dskd_ray.config"]).get("tiled"):
        _echo(
            "a tiled model: the graph scores one tile; cut, stitch and score the whole map as "
            "dskd_ray.inference.tiling does (dskd score --backend onnxruntime does)"
        )


def _day(value: str | None) -> Any:
    """--since checked as it is parsed: a bad date is a usage error, not a traceback."""
    if value is None:
        return None
    from dskd_ray.nightly.summary import parse_day

    try:
        return parse_day(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from None


GALLERY_TOP = 24  # images in --report when --top is not given


@app.command()
def results(
    output: Annotated[
        str, typer.Argument(metavar="OUTPUT", help="What `dskd score --out` wrote to (or s3://)")
    ],
    run: Annotated[str | None, typer.Option("--run", help="Only this run id")] = None,
    since: Annotated[
        str | None,
        typer.Option(
            callback=_day,
            metavar="DATE",
            help="Only runs started on DATE (YYYY-MM-DD, UTC) or later",
        ),
    ] = None,
    top: Annotated[
        int, typer.Option(min=0, help="Also list the N most anomalous images of the chosen runs")
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
            f"{GALLERY_TOP})",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more")] = False,
) -> None:
    """What the committed scoring runs under OUTPUT found: per run the images listed, scored and
    failed (by reason), how many were anomalous, score quantiles, and the drift of the night's
    scores from calibration (a warning when the bulk moved far). Uncommitted runs are never read.
    """
    _setup_logging(verbose)
    from dskd_ray.io.storage import printable
    from dskd_ray.nightly.summary import format_runs, format_top, runs_csv, summarize_runs, top_csv

    if as_json and as_csv:
        raise typer.BadParameter("choose one of --json and --csv", param_hint="--json/--csv")
    summary = summarize_runs(output, run=run, since=since, top=top)
    for figures in summary.runs:
        if figures.drift_warning:
            typer.echo(
                f"dskd: warning: run {printable(figures.run_id)}: {figures.drift_warning}", err=True
            )
    if as_json:
        typer.echo(summary.to_json(), nl=False)
    elif as_csv:
        typer.echo(top_csv(summary) if top else runs_csv(summary), nl=False)
    else:
        _echo(format_runs(summary))
        if top:
            _echo("")
            _echo(format_top(summary))
    if report is not None:
        from dskd_ray.nightly.gallery import write_gallery

        path = write_gallery(output, report, run=run, top=top or GALLERY_TOP, since=since)
        _echo(f"report: {path}")
    damaged = [r.damaged for r in summary.runs if r.damaged]
    if damaged:  # the other runs are listed above; the exit code still says something is wrong
        more = f" (and {len(damaged) - 1} more damaged run(s), listed above)" if damaged[1:] else ""
        raise DSKDError(damaged[0] + more)


_exit_code = 1  # what the process exits with if `main` never reaches its end
_exit_hooked = False


def _exit_before_native_teardown() -> None:
    """The last exit hook (`main` registers it first; they run last-in, first-out): the other
    hooks (Ray's shutdown, temporary files, child processes) have run; flush and leave, skipping
    the interpreter's and the C++ libraries' teardown. There, Arrow's or ONNX Runtime's thread
    pools can be destroyed with a worker still alive, which aborts a run that had already
    committed everything ("terminate called without an active exception", exit -6; seen on a
    `dskd score --dry-run`, apache/arrow#34314)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(_exit_code)


def main() -> None:
    """Entry point: usage errors, DSKDError and storage failures become one line on stderr and
    exit code 2 / 1 (with --verbose, after the traceback)."""
    global _exit_code, _exit_hooked
    if not _exit_hooked:  # once, before any hook a command registers
        atexit.register(_exit_before_native_teardown)
        _exit_hooked = True
    try:
        _main()
        _exit_code = 0
    except SystemExit as e:
        _exit_code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise


INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C ended


def _main() -> None:
    try:
        # Without standalone mode typer *returns* the code of an Exit it caught, and it turns
        # Ctrl-C (KeyboardInterrupt) into Exit(130): a returned code is the run's own.
        code = app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("dskd: aborted", err=True)
        sys.exit(130)
    except click_errors.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            typer.echo(e.ctx.get_help() if e.ctx else "see 'dskd --help'", err=True)
            sys.exit(2)
        command = e.ctx.command_path if e.ctx else "dskd"
        typer.echo(f"dskd: error: {e.format_message()} (see '{command} --help')", err=True)
        sys.exit(2)
    except DSKDError as e:
        _fail(e, str(e))
    except FileExistsError as e:
        _fail(e, str(e))
    except KeyboardInterrupt:
        _interrupted()
    except Exception as e:
        from dskd_ray.io.storage import describe_failure, is_storage_failure

        if not is_storage_failure(e):
            raise
        # A storage failure the library did not name a URI for: still one line.
        _fail(e, f"storage failure: {describe_failure(e)}")
    if code == INTERRUPTED:
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


def _interrupted() -> None:
    """Ctrl-C: one line, and the shell's code for it, so `dskd train … && dskd export …` stops."""
    typer.echo(f"dskd: interrupted{_interrupt_note}", err=True)
    sys.exit(INTERRUPTED)


_interrupt_note = ""  # set by a command that can say what an interruption leaves behind


def _fail(error: BaseException, message: str) -> None:
    """One line on stderr and exit 1; with --verbose the traceback first."""
    if _verbose:
        traceback.print_exception(error, file=sys.stderr)
    typer.echo(f"dskd: error: {message}", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
