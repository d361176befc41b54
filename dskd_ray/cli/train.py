"""The commands that make a model: make-demo-data, train, and the one-shot demo."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from dskd_ray.cli.console import ProgressBar, echo, setup_logging
from dskd_ray.cli.exits import note_interruption
from dskd_ray.cli.options import (
    DEFAULTS,
    WEIGHTS_HELP,
    Backbone,
    DemoBackbone,
    DemoImageSize,
    DemoMemory,
    DemoStudents,
    Device,
    ImageSize,
    Memory,
    Students,
    Verbose,
    field_default,
    given,
    opt,
)
from dskd_ray.config import (
    DEMO_CONFIG,
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_IMAGE_SIZE,
    MAX_MEMORY_SIZE,
    MAX_SEED,
    MAX_THREADS,
    MAX_WORKERS,
    DSKDConfig,
    RayOptions,
    input_fields,
)
from dskd_ray.errors import DSKDError


def _memory_weight(value: str | None) -> dict[str, Any]:
    """`--memory-weight auto|W` as config fields: a number fixes the weight, auto picks it."""
    if value is None or value == "auto":
        return {} if value is None else {"memory_weight_fit": "synthetic"}
    try:
        weight = float(value)
    except ValueError:
        weight = float("nan")
    if not 0.0 <= weight <= 1.0:  # NaN too
        raise typer.BadParameter(
            f"{value!r} must be a number from 0 to 1, or auto", param_hint="'--memory-weight'"
        )
    return {"memory_weight": weight, "memory_weight_fit": "none"}


# Options that change nothing a model computes unless it has the memory, or students: given
# anyway they were accepted in silence, and those in the model id changed it for nothing.
MEMORY_OPTIONS = ("memory_weight", "memory_size", "memory_sampling")
STUDENT_OPTIONS = ("memory_weight", "df_input", "feature_norm", "distance", "pyramid")


def _refuse_unused(config: DSKDConfig, given_options: dict[str, Any]) -> None:
    """A one-line usage error (exit 2) for an option the model would not use."""
    if not config.has_memory:
        for name in MEMORY_OPTIONS:
            if given_options.get(name) is not None:
                flag = "--" + name.replace("_", "-")
                raise typer.BadParameter(
                    "the model has no memory (--memory none): it would change nothing",
                    param_hint=f"'{flag}'",
                )
    if not config.has_students:
        for name in STUDENT_OPTIONS:
            if given_options.get(name) is not None:
                flag = "--" + name.replace("_", "-")
                raise typer.BadParameter(
                    "the model has no students (--students none): its map is the memory's "
                    "own, and this would change nothing",
                    param_hint=f"'{flag}'",
                )


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
        echo(f"{name}: {path}")


def train(
    data: Annotated[
        str,
        typer.Argument(help="MVTec category folder or folder of normal images (local or s3://)"),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Checkpoint to write (local or s3://)")],
    epochs: Annotated[
        int | None, opt(DEFAULTS.epochs, min=1, max=MAX_EPOCHS, help="Training epochs")
    ] = None,
    batch_size: Annotated[
        int | None,
        opt(
            DEFAULTS.batch_size,
            min=1,
            max=MAX_BATCH_SIZE,
            help="Images per step; with --workers, the global batch split over them",
        ),
    ] = None,
    image_size: ImageSize = None,
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
        opt(DEFAULTS.tile_overlap, min=0, help="With --tile: pixels neighbouring tiles share"),
    ] = None,
    backbone: Backbone = None,
    teacher_weights: Annotated[str | None, opt(DEFAULTS.teacher_weights, help=WEIGHTS_HELP)] = None,
    students: Students = None,
    memory: Memory = None,
    memory_size: Annotated[
        int | None,
        opt(
            DEFAULTS.memory_size,
            min=1,
            max=MAX_MEMORY_SIZE,
            help="With --memory knn: patches in the bank, at most (the scoring cost)",
        ),
    ] = None,
    memory_sampling: Annotated[
        str | None,
        opt(
            DEFAULTS.memory_sampling,
            help="With --memory knn: how the bank is picked: coreset | random",
        ),
    ] = None,
    memory_weight: Annotated[
        str | None,
        opt(
            "auto",
            help="With --memory knn and students: the memory's share of the map, from 0 to 1, "
            "or auto: picked after training by synthetic defects in the held-out images",
        ),
    ] = None,
    df_input: Annotated[
        str | None, opt(DEFAULTS.df_input, help="What feeds the DF embedding: se | teacher")
    ] = None,
    level_fusion: Annotated[
        str | None, opt(DEFAULTS.level_fusion, help="Combine levels by: sum | product")
    ] = None,
    level_normalization: Annotated[
        str | None,
        opt(
            DEFAULTS.level_normalization,
            help="Put each level map on a common scale first, from held-out normal images: "
            "none | mean (÷ its mean) | standardize (÷ its std)",
        ),
    ] = None,
    map_baseline: Annotated[
        str | None,
        opt(
            DEFAULTS.map_baseline,
            help="The map's per-pixel mean on normal images: subtract it (cut at zero) | "
            "mean (divide by it) | none",
        ),
    ] = None,
    score_top_k: Annotated[
        int | None,
        opt(
            DEFAULTS.score_top_k,
            min=1,
            max=MAX_IMAGE_SIZE**2,
            help="Image score: mean of the K highest map pixels (1: the max)",
        ),
    ] = None,
    denoise: Annotated[
        float | None,
        opt(
            DEFAULTS.denoise,
            min=0.0,
            max=1.0,
            help="Share of each batch given synthetic defects (made from the training images) "
            "that the students learn to ignore: 0 (off) to 1",
        ),
    ] = None,
    pyramid: Annotated[
        str | None,
        opt(
            DEFAULTS.pyramid,
            help="Teacher levels distilled, by stride: 4-8-16 | 8-16-32 (the trunk runs on to "
            "stride 32)",
        ),
    ] = None,
    encoder_student: Annotated[
        str | None,
        opt(
            DEFAULTS.encoder_student,
            help="The encoder student: teacher (a fresh copy of its trunk) | resnet (a fresh "
            "ResNet18-style network read out to the teacher's channels)",
        ),
    ] = None,
    feature_norm: Annotated[
        str | None,
        opt(
            DEFAULTS.feature_norm,
            help="Compare features as they are (none) or with each teacher channel standardised "
            "by its training-image mean and std (standardize), in the loss and the map",
        ),
    ] = None,
    distance: Annotated[
        str | None,
        opt(
            DEFAULTS.distance,
            help="Teacher-student distance per position: cosine | l2 (mean squared difference)",
        ),
    ] = None,
    optimizer: Annotated[
        str | None, opt(DEFAULTS.optimizer, help="adam | sgd (momentum 0.9; STFPM: --lr 0.4)")
    ] = None,
    lr: Annotated[float | None, opt(DEFAULTS.lr, min=0.0, help="Learning rate (> 0)")] = None,
    weight_decay: Annotated[
        float | None, opt(DEFAULTS.weight_decay, min=0.0, help="The optimiser's weight decay")
    ] = None,
    lr_schedule: Annotated[str | None, opt(DEFAULTS.lr_schedule, help="constant | cosine")] = None,
    loss_form: Annotated[
        str | None,
        opt(
            DEFAULTS.loss_form,
            help="Loss per level: flat (1 − cos of each image's whole level map, as Reverse "
            "Distillation) | pixel (mean of per-position 1 − cos, the paper's)",
        ),
    ] = None,
    hard_mining: Annotated[
        float | None,
        opt(
            DEFAULTS.hard_mining,
            min=0.0,
            max=1.0,
            help="Share of the easiest positions whose gradients are scaled by 0.1 (< 1)",
        ),
    ] = None,
    seed: Annotated[int | None, opt(DEFAULTS.seed, min=0, max=MAX_SEED, help="Random seed")] = None,
    holdout_fraction: Annotated[
        float | None,
        opt(
            DEFAULTS.holdout_fraction,
            min=0.0,
            max=1.0,
            help="Normal images held out for the threshold (< 1)",
        ),
    ] = None,
    threshold_quantile: Annotated[
        float | None,
        opt(
            DEFAULTS.threshold_quantile,
            min=0.0,
            max=1.0,
            help="Quantile of held-out scores used as threshold (> 0)",
        ),
    ] = None,
    device: Device = "auto",
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted local run from --out (Ray: --run-name)")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, max=MAX_WORKERS, help="Train on Ray Train with N DDP workers (default: local)"
        ),
    ] = None,
    gpus_per_worker: Annotated[
        float | None,
        opt(
            field_default(RayOptions, "gpus_per_worker"),
            min=0.0,
            help="Ray: GPUs per worker (0: CPU)",
        ),
    ] = None,
    cpus_per_worker: Annotated[
        int | None,
        opt(
            field_default(RayOptions, "cpus_per_worker"),
            min=1,
            max=MAX_THREADS,
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
        opt(
            field_default(RayOptions, "checkpoint_every"),
            min=1,
            max=MAX_EPOCHS,
            help="Ray: epochs between checkpoints",
        ),
    ] = None,
    keep_checkpoints: Annotated[
        int | None,
        opt(
            field_default(RayOptions, "keep_checkpoints"),
            min=1,
            max=MAX_EPOCHS,
            help="Ray: checkpoints kept in storage",
        ),
    ] = None,
    max_failures: Annotated[
        int | None,
        opt(
            field_default(RayOptions, "max_failures"),
            min=-1,
            max=MAX_WORKERS,
            help="Ray: worker-group restarts allowed (-1: no limit)",
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Train the students on normal images (and fit the teacher's memory, with --memory knn);
    write a checkpoint with its threshold.

    With --workers N it runs on Ray Train (DDP over the students, one image shard per worker),
    checkpoints every epoch to --storage-path/--run-name, and resumes when run again.
    """
    setup_logging(verbose)
    from dskd_ray.training.loop import train as run_training

    if workers is None and (address or storage_path or run_name or gpus_per_worker):
        raise DSKDError(
            "--address, --storage-path, --run-name and --gpus-per-worker need --workers N"
        )

    asked = given(
        **input_fields(image_size, tile, tile_overlap), epochs=epochs, batch_size=batch_size,
        backbone=backbone,
        teacher_weights=teacher_weights, students=students, df_input=df_input, memory=memory,
        memory_size=memory_size, memory_sampling=memory_sampling, **_memory_weight(memory_weight),
        level_fusion=level_fusion, level_normalization=level_normalization, map_baseline=map_baseline,
        score_top_k=score_top_k, lr=lr, lr_schedule=lr_schedule, seed=seed,
        loss_form=loss_form, hard_mining=hard_mining, feature_norm=feature_norm, distance=distance,
        denoise=denoise, pyramid=pyramid, encoder_student=encoder_student, optimizer=optimizer,
        weight_decay=weight_decay,
        holdout_fraction=holdout_fraction, threshold_quantile=threshold_quantile,
    )  # fmt: skip
    config = DSKDConfig(**asked)
    _refuse_unused(config, {
        "memory_weight": memory_weight, "memory_size": memory_size,
        "memory_sampling": memory_sampling, "df_input": df_input, "feature_norm": feature_norm,
        "distance": distance, "pyramid": pyramid,
    })  # fmt: skip
    start = time.perf_counter()
    if workers is not None:
        from dskd_ray.training.distributed import train_distributed

        options = RayOptions(workers=workers, **given(
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
            with ProgressBar(Path(data).name or data) as bar:
                result = run_training(
                    config, data, out, device=device, resume=resume, on_progress=bar, asked=asked
                )
        except KeyboardInterrupt:
            if not had_out and checkpoint_exists(out):  # written after a whole epoch
                note_interruption(
                    f"; {out} holds the last whole epoch: the same command with --resume goes on"
                )
            raise
    ckpt = result.checkpoint
    if result.skipped:
        echo(f"skipped {len(result.skipped)} unreadable image(s): see the warnings above")
    threshold = f"{ckpt.threshold.value:.4f}" if ckpt.threshold else "none (no hold-out)"
    echo(
        f"trained on {result.n_train} images ({result.n_holdout} held out) in "
        f"{time.perf_counter() - start:.0f} s; threshold {threshold}; model {ckpt.model_id}"
    )
    picked = ckpt.meta.get("memory_weight")
    if picked:
        at = {row["weight"]: row["image_auroc"] for row in picked["table"]}
        echo(
            f"memory weight {picked['chosen']:g}, picked by synthetic defects in "
            f"{picked['held_out']} held-out images (image AUROC {at[picked['chosen']]:.3f}; "
            f"{at[0.5]:.3f} at 0.5)"
        )
    echo(f"checkpoint: {out}")


def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the data, models and metrics go")
    ] = Path("dskd-demo"),
    epochs: Annotated[
        int | None,
        opt(DEMO_CONFIG.epochs, min=1, max=MAX_EPOCHS, help="Training epochs per category"),
    ] = None,
    batch_size: Annotated[
        int | None, opt(DEMO_CONFIG.batch_size, min=1, max=MAX_BATCH_SIZE, help="Images per step")
    ] = None,
    image_size: DemoImageSize = None,
    backbone: DemoBackbone = None,
    students: DemoStudents = None,
    memory: DemoMemory = None,
    device: Device = "auto",
    verbose: Verbose = False,
) -> None:
    """Demo data → train one model per category → evaluate → a metrics table and an HTML
    evaluation report per category."""
    setup_logging(verbose)
    from dskd_ray.demo.run import ensure_demo_data, run_demo
    from dskd_ray.evaluation.evaluate import format_table

    start = time.perf_counter()
    config = DEMO_CONFIG.replace(**given(
        epochs=epochs, batch_size=batch_size, image_size=image_size, backbone=backbone,
        students=students, memory=memory,
    ))  # fmt: skip
    data_dir, made = ensure_demo_data(directory)
    echo(f"demo data: {data_dir}" + ("" if made else " (already there)"))
    run = run_demo(directory, config, device=device, progress=ProgressBar)
    echo("")
    echo(format_table(run.table))
    echo("")
    echo(f"models:  {run.models}")
    echo(f"metrics: {run.metrics_path}")
    echo(f"done in {time.perf_counter() - start:.0f} s")
    echo(f"report:  {run.report}  (open it in a browser: curves, histograms, the worst images)")
