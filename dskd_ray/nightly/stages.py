"""The pipeline's stages, one batch of images at a time, each returning rows and never
raising for one bad image: `decode_batch` (CPU tasks; the decoder runs in a child
process), `ScoringActor` (loads the model once per actor, scores), `write_maps_batch`
(the 16-bit PNG maps)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dskd_ray.evaluation.metrics import is_anomalous
from dskd_ray.inference import tiling
from dskd_ray.io.decoder_process import DecoderCrashed, shared_decoder
from dskd_ray.io.images import ImageDecodeError
from dskd_ray.io.map_png import encode_map_png, map_uri, quantize_map
from dskd_ray.io.storage import explain_read_failure, printable, read_object, write_object
from dskd_ray.nightly.attempts import (
    Attempts,
    clean_stale_scratch,
    score_guarded,
)
from dskd_ray.nightly.results import (
    RESULT_SCHEMA,
    utc_now,
)

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class ScorerSpec:
    """What a `ScoringActor` builds its scorer from, the same in this process and on Ray.

    On Ray the checkpoint and the graph are object refs: inside this object Ray leaves them
    unresolved, so each actor fetches them itself, once, instead of every task shipping them.
    """

    checkpoint: Any  # a Checkpoint, or an object ref to one
    device: str
    batch_size: int
    threads: int  # torch threads (or ONNX Runtime's) per actor
    precision: str = "fp32"
    compile: bool = False
    graph: Any = None  # --backend onnxruntime: the exported graph (bytes, or an object ref)
    run_id: str | None = None  # on Ray: the run whose scratch folder counts the attempts


def _fetched(value: Any, kind: type) -> Any:
    """`value`, or on Ray (an object ref, not in process) the object it names."""
    if isinstance(value, kind):
        return value
    import ray

    return ray.get(value)


class ScoringActor:
    """Scores decoded images; one model per actor, loaded once in `__init__`."""

    def __init__(self, spec: ScorerSpec) -> None:
        import torch

        from dskd_ray.model.checkpoint import Checkpoint

        # On Ray: a batch that kills this actor twice is scored image by image, counted in this
        # node's scratch folder (batch_attempts), where a killed run's leftovers are cleaned.
        self.attempts = None
        if spec.run_id is not None:
            clean_stale_scratch()
            self.attempts = Attempts.for_run(spec.run_id)

        # Ray sets OMP_NUM_THREADS=1 in actors (docs/design.md §7): ask for the threads we want.
        torch.set_num_threads(spec.threads)
        if spec.graph is not None:  # --backend onnxruntime: the exported graph, not the model
            from dskd_ray.onnx.runtime import OnnxScorer

            graph = _fetched(spec.graph, bytes)
            self.scorer = OnnxScorer(graph, batch_size=spec.batch_size, threads=spec.threads)
            return
        from dskd_ray.inference.scoring import Scorer

        self.scorer = Scorer(
            _fetched(spec.checkpoint, Checkpoint),
            device=spec.device,
            batch_size=spec.batch_size,
            precision=spec.precision,
            compile=spec.compile,
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
    # The verdict is made here, from the row's own score and threshold, whichever backend
    # scored it: a row always says score > threshold (docs/design.md §5).
    flags = is_anomalous(batch["score"], threshold)
    no_flag = ~ok if flags is None else ~ok | ~np.isfinite(batch["score"])
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
            "is_anomalous": pa.array(
                np.zeros(n, bool) if flags is None else flags,
                pa.bool_(),
                mask=np.ones(n, bool) if flags is None else no_flag,
            ),
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
