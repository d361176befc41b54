"""The commands that use a model on images: evaluate (the metrics) and predict (overlays)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dskd_ray.cli.console import echo, setup_logging
from dskd_ray.cli.options import Device, Model, Verbose, opt
from dskd_ray.config import MAX_BATCH_SIZE
from dskd_ray.errors import DSKDError

EVAL_BATCH = 16  # images per forward pass in `evaluate`


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
    device: Device = "auto",
    batch_size: Annotated[
        int | None, opt(EVAL_BATCH, min=1, max=MAX_BATCH_SIZE, help="Images per forward pass")
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Image/pixel AUROC, AUPRO (FPR ≤ 0.3) and F1-max per category and their mean.

    With --report DIR it also writes DIR/index.html (opens from disk): the table, ROC and PRO
    curves, and overlays of the worst false positives and false negatives.
    """
    setup_logging(verbose)
    from dskd_ray.evaluation.evaluate import evaluate_category, format_table, models_for, summarize
    from dskd_ray.inference.scoring import Scorer

    if json_path is not None:  # found now, not after the whole evaluation
        if json_path.is_dir():
            raise DSKDError(f"--json {json_path} is a folder: give a file name (metrics.json)")
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DSKDError(f"--json {json_path}: cannot make its folder ({e.strerror})") from e
    html_report = None
    if report is not None:
        from dskd_ray.evaluation.report import Report

        html_report = Report(report)
    results = []
    for category, ckpt in models_for(data, model):
        scorer = Scorer(ckpt, device=device, batch_size=batch_size or EVAL_BATCH)
        result = evaluate_category(scorer, category, keep_maps=html_report is not None)
        if html_report is not None:
            html_report.add(result, scorer.threshold, model=f"{ckpt} ({scorer.model_id})")
            result.maps = result.masks = None  # rendered: free them before the next category
        results.append(result)
    table = summarize(results)
    echo(format_table(table))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(table, indent=2) + "\n")
        echo(f"metrics: {json_path}")
    if html_report is not None:
        echo(f"report: {html_report.write(table)}")


def predict(
    images: Annotated[list[str], typer.Argument(help="Image files (local or s3://)")],
    model: Model,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for overlays and scores.csv")],
    device: Device = "auto",
    verbose: Verbose = False,
) -> None:
    """Score images; write each one's overlay PNG (heat map over the image) and scores.csv."""
    setup_logging(verbose)
    from dskd_ray.inference.predict import Prediction, predict_images

    def say(p: Prediction) -> None:
        if p.error is not None:
            typer.echo(f"dskd: error: {p.image}: {p.error}", err=True)
            return
        verdict = {None: "", True: "  ANOMALOUS", False: "  normal"}[p.is_anomalous]
        echo(f"{p.image}: {p.score:.4f}{verdict}")

    done = predict_images(images, model, out, device=device, on_prediction=say)
    threshold = "none" if done.threshold is None else f"{done.threshold:.4f}"
    echo(f"threshold {threshold}; overlays and scores.csv in {out}")
    if done.failures:
        raise DSKDError(
            f"{done.failures} of {len(images)} image(s) could not be scored (see scores.csv)"
        )
