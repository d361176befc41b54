"""The command that exports a model's scoring graph to ONNX."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from dskd_ray.cli.console import echo, setup_logging
from dskd_ray.cli.options import Verbose


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
    verbose: Verbose = False,
) -> None:
    """Export the scoring graph to ONNX: images in [0, 1] → anomaly_map and score, exactly as
    `dskd score` computes them. Checked against PyTorch before it is written; a graph that
    scores differently is never written."""
    setup_logging(verbose)
    from dskd_ray.onnx.export import check_export_target, export_onnx, load_check_images

    check_export_target(model, out, force)  # before the check images are read
    images = None if check_images is None else load_check_images(model, check_images)
    result = export_onnx(model, out, images, force=force)
    meta = result.metadata
    echo(
        f"wrote {out}: model {meta['dskd_ray.model_id']}, {meta['dskd_ray.image_size']}² input, "
        f"threshold {meta['dskd_ray.threshold']}"
    )
    echo(f"checked against PyTorch on {result.check.format()}")
    if json.loads(meta["dskd_ray.config"]).get("tiled"):
        echo(
            "a tiled model: the graph scores one tile; cut, stitch and score the whole map as "
            "dskd_ray.inference.tiling does (dskd score --backend onnxruntime does)"
        )
