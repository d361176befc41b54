"""`dskd export`: one ONNX graph from images to the maps and scores `dskd score` writes.

Input `image`: float32 (N, 3, H, W) RGB in [0, 1] at the model's size, N dynamic. Outputs
`anomaly_map` (N, H, W) and `score` (N). Everything in the checkpoint that shapes a score —
the backbone's input normalisation, both students, the level statistics, the fusion, the blur,
the per-pixel baseline, the top-k image score — is inside the graph: exported anomaly models
disagree with their originals mostly because pre- or post-processing lives outside the graph.
The threshold, model id, image size and checkpoint format go into the ONNX metadata.

An export is checked before it is written: ONNX Runtime and PyTorch score the same images, and a
graph outside `MAP_TOLERANCE` / `SCORE_TOLERANCE`, or with a different verdict at the threshold,
is refused with the figures — never written (docs/design.md §6).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dskd_ray.errors import DSKDError
from dskd_ray.evaluation.metrics import is_anomalous
from dskd_ray.io import file_kind
from dskd_ray.io.data import list_images, load_images
from dskd_ray.io.storage import (
    exists,
    is_dir,
    read_head,
    same_place,
    storage_errors,
    write_object,
)
from dskd_ray.model.checkpoint import FORMAT, Checkpoint, library_versions, load_checkpoint
from dskd_ray.model.inputs import images_to_tensor
from dskd_ray.model.network import DSKD
from dskd_ray.onnx.graph import (
    INPUT_NAME,
    METADATA,
    OUTPUT_NAMES,
    ExportError,
    _require_onnx,
    _version,
    read_metadata,
    session_for,
    with_metadata,
)

log = logging.getLogger(__name__)

MAP_TOLERANCE = 1e-4  # max |ΔΔmap| relative to the batch's largest map value
SCORE_TOLERANCE = 1e-5  # max |Δscore| relative to the batch's largest score


class ScoringGraph(nn.Module):
    """The exported function: `DSKD.maps_and_scores` with the checkpoint's own settings."""

    def __init__(self, model: DSKD) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.maps_and_scores(image)


@dataclass(frozen=True)
class ExportCheck:
    """How the written graph compares with PyTorch on the check images."""

    images: int
    map_error: float  # relative, see MAP_TOLERANCE
    score_error: float  # relative, see SCORE_TOLERANCE
    verdicts_equal: bool

    @property
    def passed(self) -> bool:
        return (
            self.map_error <= MAP_TOLERANCE
            and self.score_error <= SCORE_TOLERANCE
            and self.verdicts_equal
        )

    def format(self) -> str:
        return (
            f"{self.images} images: map error {self.map_error:.1e} (tolerance {MAP_TOLERANCE:g}), "
            f"score error {self.score_error:.1e} (tolerance {SCORE_TOLERANCE:g}), verdicts "
            f"{'identical' if self.verdicts_equal else 'DIFFERENT'}"
        )


@dataclass(frozen=True)
class ExportResult:
    graph: bytes
    check: ExportCheck
    metadata: dict[str, str]
    seconds: float


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got − want| over the batch, relative to the largest |want| (0 when both are 0)."""
    scale = float(np.abs(want).max()) if want.size else 0.0
    diff = float(np.abs(got.astype(np.float64) - want).max()) if want.size else 0.0
    return diff / scale if scale > 0 else diff


def check_images(image_size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """(n, S, S, 3) uint8 stand-ins when the caller has no real images: noise, a gradient, flat."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, image_size, dtype=np.float32)
    images[min(1, n - 1)] = np.stack([ramp[None, :] + 0 * ramp[:, None]] * 3, -1).astype(np.uint8)
    images[n - 1] = 128
    return images


CHECK_IMAGES_READ = 16  # real images an export is checked on, at most


def load_check_images(checkpoint: str, images_uri: str) -> np.ndarray:
    """The first real images under `images_uri` at the checkpoint's input size, to check the
    graph on (--check-images) instead of the stand-ins."""
    size = load_checkpoint(checkpoint).config.image_size
    images, _, _ = load_images(list_images(images_uri)[:CHECK_IMAGES_READ], size)
    if not len(images):
        raise DSKDError(f"--check-images {images_uri}: no readable images there")
    return images


def graph_metadata(checkpoint: Checkpoint) -> dict[str, str]:
    """What a reader of the graph needs besides the graph: every value a string, JSON inside."""
    cfg = checkpoint.config
    threshold = checkpoint.threshold
    return {
        f"{METADATA}model_id": checkpoint.model_id,
        f"{METADATA}checkpoint_format": FORMAT,
        f"{METADATA}image_size": str(cfg.image_size),
        f"{METADATA}threshold": json.dumps(threshold.value if threshold else None),
        f"{METADATA}threshold_method": threshold.method if threshold else "",
        f"{METADATA}normal_scores": json.dumps(threshold.normal_scores if threshold else []),
        f"{METADATA}config": json.dumps(cfg.to_dict(), sort_keys=True),
        f"{METADATA}input": "image: float32 (N, 3, H, W), RGB in [0, 1], H = W = image_size",
        f"{METADATA}outputs": "anomaly_map: float32 (N, H, W); score: float32 (N); anomalous "
        "when score > threshold",
        f"{METADATA}exported_with": json.dumps(
            {**library_versions(), "onnx": _version("onnx")}, sort_keys=True
        ),
    }


def _trace(model: DSKD, image_size: int) -> bytes:
    """The scoring graph as serialised ONNX with a dynamic batch dimension."""
    import torch.onnx

    example = torch.rand(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                ScoringGraph(model).eval(),
                (example,),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"image": {0: batch}},
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # torch's exporter names the operator it could not translate
        raise ExportError(f"the scoring graph could not be exported: {e}") from e
    return program.model_proto.SerializeToString()


def compare(graph: bytes, model: DSKD, images: np.ndarray, threshold: float | None) -> ExportCheck:
    """ONNX Runtime against `DSKD.predict` on the same uint8 images, one batch."""
    x = images_to_tensor(images, "cpu")
    want_maps, want_scores = (t.numpy() for t in model.predict(x))
    got_maps, got_scores = session_for(graph).run(None, {INPUT_NAME: x.numpy()})
    want_flags = is_anomalous(want_scores, threshold)
    got_flags = is_anomalous(got_scores, threshold)
    same = want_flags is None or bool(np.array_equal(want_flags, got_flags))
    return ExportCheck(
        len(images), relative_error(got_maps, want_maps), relative_error(got_scores, want_scores),
        same,
    )  # fmt: skip


def export_graph(checkpoint: Checkpoint | str, images: np.ndarray | None = None) -> ExportResult:
    """The checkpoint's scoring graph, checked against PyTorch on `images` ((B, S, S, 3) uint8;
    default: `check_images`). Raises ExportError when the graph cannot match."""
    _require_onnx()
    start = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    ckpt.require_finished(None if isinstance(checkpoint, Checkpoint) else checkpoint)
    size = ckpt.config.image_size
    # The graph is traced in float32 on the CPU: what a CPU runtime runs, whatever trained it.
    model = ckpt.build_model().to("cpu").float().eval()
    metadata = graph_metadata(ckpt)
    graph = with_metadata(_trace(model, size), metadata)
    images = check_images(size) if images is None else images
    if images.shape[1:] != (size, size, 3):
        raise ExportError(f"check images must be ({size}, {size}, 3) uint8, got {images.shape[1:]}")
    threshold = ckpt.threshold.value if ckpt.threshold else None
    check = compare(graph, model, images, threshold)
    if not check.passed:
        raise ExportError(
            f"the exported graph does not score like the model, not written: {check.format()}"
        )
    return ExportResult(graph, check, metadata, time.perf_counter() - start)


def export_onnx(
    checkpoint: Checkpoint | str,
    out: str,
    images: np.ndarray | None = None,
    force: bool = False,
) -> ExportResult:
    """`export_graph`, then written to `out` (local or s3://) in one piece, only if it passed.

    `out` is checked first (`check_export_target`): never the checkpoint itself, and never
    over a file that is not an ONNX graph unless `force`."""
    if isinstance(checkpoint, str):
        check_export_target(checkpoint, out, force)
    result = export_graph(checkpoint, images)
    write_object(out, result.graph, durable=True)
    _fill_cache(result)
    return result


def _fill_cache(result: ExportResult) -> None:
    """Keep the checked graph where `cached_graph` looks, so the model's first
    `--backend onnxruntime` (or auto) run does not export it again. Best effort: the file at
    --out is what was asked for."""
    path = _cache_path(result.metadata[METADATA + "model_id"])
    if path.is_file():
        return
    try:
        write_object(str(path), result.graph, durable=False)
    except Exception as e:  # noqa: BLE001 - a read-only home, a full disk: only the cache is lost
        log.warning("could not keep the graph in the cache %s: %s", path, e)


def check_export_target(checkpoint: str, out: str, force: bool = False) -> None:
    """Refuse an `out` that is the checkpoint, however spelled (the export would replace the
    model with its graph), or an existing file that is not an ONNX graph, unless `force`."""
    with storage_errors(out):
        if same_place(checkpoint, out):
            raise ExportError(
                f"--out {out} is the checkpoint {checkpoint} itself: write the graph to a new "
                "file (model.onnx)"
            )
        if force or not exists(out) or is_dir(out):
            return
        head = read_head(out, file_kind.HEAD_BYTES)
    if not file_kind.looks_like_onnx(head):
        kind = file_kind.describe(head)
        if file_kind.is_torch_archive(head):
            kind = "a PyTorch file, a checkpoint perhaps"
        looks = f" (this looks like {kind})" if kind else ""
        raise ExportError(
            f"--out {out} exists and is not an ONNX graph{looks}: not overwritten; choose "
            "another --out, or add --force to replace it"
        )


def graph_cache_path(checkpoint: Checkpoint) -> Path:
    """Where `cached_graph` keeps this model's graph (for these library versions)."""
    return _cache_path(checkpoint.model_id)


def _cache_path(model_id: str) -> Path:
    versions = library_versions()
    key = f"{model_id}-torch{versions.get('torch', '?')}-onnx{_version('onnx')}"
    root = Path(
        os.environ.get("DSKD_RAY_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dskd_ray"
    )
    return root / "onnx" / f"{key}.onnx"


def cached_graph(checkpoint: Checkpoint) -> bytes:
    """The checkpoint's checked graph, exported once per model id and library versions.

    The cache (``$DSKD_RAY_CACHE`` or ``~/.cache/dskd_ray``) saves the export (tens of seconds
    on a small CPU) on every nightly run of the same model.
    """
    path = graph_cache_path(checkpoint)
    if path.is_file():
        graph = path.read_bytes()
        try:
            if read_metadata(graph).get("model_id") == checkpoint.model_id:
                return graph
        except Exception:  # noqa: BLE001 - a torn cache file is exported again
            pass
        log.warning("cached graph %s is not this model's; exporting again", path)
    result = export_graph(checkpoint)
    log.info(
        "exported %s in %.1f s: %s", checkpoint.model_id, result.seconds, result.check.format()
    )
    write_object(str(path), result.graph, durable=False)
    return result.graph
