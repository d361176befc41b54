"""The pipeline's stages, one batch of images at a time, each returning rows and never
raising for one bad image: `decode_batch` (CPU tasks; the decoder runs in a child
process), `ScoringActor` (loads each model once per actor, scores), `write_maps_batch`
(the 16-bit PNG maps).

A run of several models (`dskd score --models`) sends a `model_key` column (which of the
spec's models scores the row) and a `route_code` column (its route's name, by index) through
the stages; a batch holds one model's images (`nightly.fleet` forms the blocks per model), but
every stage works row by row on those keys, whatever a batch holds."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # torch is imported by the actors only: the CPU tasks start sooner without it
    from dskd_ray.inference.scoring import BatchScorer

log = logging.getLogger(__name__)


# Columns of a run of several models that every stage passes on (see the module's docstring).
PASSED_THROUGH = ("model_key", "route_code")


def decode_batch(
    batch: dict[str, np.ndarray],
    image_size: int | None,
    io_threads: int,
    model_sizes: Sequence[int | None] | None = None,
) -> dict[str, Any]:
    """Read and decode a block of images (a CPU task) to image_size², or, for a tiled model
    (image_size None), at full resolution. With `model_sizes`, each row's size is its model's
    (`model_sizes[model_key]`). Failures become error rows; the columns of a run of several models
    (`model_key`, `route_code`) pass through."""
    uris = [str(u) for u in batch["image_uri"]]
    n = len(uris)
    if model_sizes is not None:
        row_sizes = [model_sizes[int(k)] for k in batch["model_key"]]
    else:
        row_sizes = [image_size] * n
    if len(set(row_sizes)) == 1 and row_sizes[0] is not None:
        images = np.zeros((n, row_sizes[0], row_sizes[0], 3), np.uint8)
    else:  # sizes differ: one array per image (an error row keeps a 1×1)
        images = np.empty(n, object)
        images[:] = [np.zeros((1, 1, 3), np.uint8) for _ in range(n)]
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
                    images[i], (width[i], height[i]) = decoder.decode(data, row_sizes[i])
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
    passed = {k: batch[k] for k in PASSED_THROUGH if k in batch}
    return {
        **passed,
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
class ModelSpec:
    """One model a `ScoringActor` may score with: what it is built from, and what its rows say.

    On Ray the checkpoint and the graph are object refs: inside this object Ray leaves them
    unresolved, so each actor fetches them itself, once, instead of every task shipping them.
    """

    model_id: str  # checked against the scorer built: rows name the model that scored them
    threshold: float | None
    image_size: int
    tiled: bool
    checkpoint: Any = None  # a Checkpoint, its URI, or an object ref to one (the torch backend)
    graph: Any = None  # the onnxruntime backend: the exported graph (bytes, or an object ref)

    @property
    def decode_size(self) -> int | None:
        """What images are decoded to for this model: its size, or None (full resolution)."""
        return None if self.tiled else self.image_size


@dataclass(frozen=True)
class ScorerSpec:
    """What a `ScoringActor` builds its scorers from, the same in this process and on Ray."""

    models: tuple[ModelSpec, ...]  # rows name one by `model_key` (0 without that column)
    device: str
    batch_size: int
    threads: int  # torch threads (or ONNX Runtime's) per actor
    precision: str = "fp32"
    compile: bool = False
    run_id: str | None = None  # on Ray: the run whose scratch folder counts the attempts
    models_per_actor: int = 1  # several models: how many an actor keeps loaded


def _fetched(value: Any, kind: type) -> Any:
    """`value`; a checkpoint's URI, loaded (in process, a run of several models); or on Ray (an
    object ref) the object it names."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        from dskd_ray.model.checkpoint import load_checkpoint

        return load_checkpoint(value)
    import ray

    return ray.get(value)


class ScoringActor:
    """Scores decoded images, each with the model its row names. One model is loaded once, in
    `__init__`; of several, each is loaded when a batch first needs it and the
    `models_per_actor` used last are kept, the oldest dropped before the next is built (a
    night's batches come model after model, so an actor loads each about once). A model that
    cannot be built here gives its rows errors."""

    def __init__(self, spec: ScorerSpec) -> None:
        import torch

        # On Ray: a batch that kills this actor twice is scored image by image, counted in this
        # node's scratch folder (batch_attempts), where a killed run's leftovers are cleaned.
        self.attempts = None
        if spec.run_id is not None:
            clean_stale_scratch()
            self.attempts = Attempts.for_run(spec.run_id)

        # Ray sets OMP_NUM_THREADS=1 in actors (docs/design.md §7): ask for the threads we want.
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.loaded: OrderedDict[int, BatchScorer] = OrderedDict()
        self.unusable: dict[int, str] = {}  # model key → why it could not be built here
        self.loads = 0  # models built by this actor (a measure of switching between them)
        if len(spec.models) == 1:  # one model: loaded here, and a failure fails the actor
            self.loaded[0] = self._build(0)

    def _build(self, key: int) -> BatchScorer:
        from dskd_ray.errors import CheckpointError
        from dskd_ray.model.checkpoint import Checkpoint

        model = self.spec.models[key]
        scorer: BatchScorer
        if model.graph is not None:  # --backend onnxruntime: the exported graph, not the model
            from dskd_ray.onnx.runtime import OnnxScorer

            graph = _fetched(model.graph, bytes)
            scorer = OnnxScorer(graph, batch_size=self.spec.batch_size, threads=self.spec.threads)
        else:
            from dskd_ray.inference.scoring import Scorer

            scorer = Scorer(
                _fetched(model.checkpoint, Checkpoint),
                device=self.spec.device,
                batch_size=self.spec.batch_size,
                precision=self.spec.precision,
                compile=self.spec.compile,
            )
        if scorer.model_id != model.model_id:  # the rows must name the model that scored them
            raise CheckpointError(
                f"the model built is {scorer.model_id}, not the run's {model.model_id}"
            )
        self.loads += 1
        return scorer

    def scorer(self, key: int) -> BatchScorer | None:
        """The scorer of model `key`, built on first use; None if it cannot be (`unusable`)."""
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        if key in self.unusable:
            return None
        while len(self.loaded) >= max(1, self.spec.models_per_actor):
            self.loaded.popitem(last=False)  # the one used longest ago
        try:
            self.loaded[key] = self._build(key)
        except Exception as e:  # noqa: BLE001 - this model's rows say why; the others score
            log.exception("model %s cannot be built", self.spec.models[key].model_id)
            self.unusable[key] = _describe(e)
            return None
        return self.loaded[key]

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
        n = len(status)
        keys = np.asarray(batch.get("model_key", np.zeros(n, np.int32)), np.int64)
        models = self.spec.models
        score = np.full(n, np.nan, np.float32)
        # Each row names its model and threshold (NaN: none): the verdict is made from them
        # where the row is shaped (write_maps_batch).
        model_id = np.array([models[k].model_id for k in keys], dtype=object)
        threshold = np.array([_or_nan(models[k].threshold) for k in keys], np.float64)
        sizes = {(models[k].tiled, models[k].image_size) for k in set(keys.tolist())}
        if len(sizes) == 1 and not next(iter(sizes))[0]:  # one untiled size: one array
            size = next(iter(sizes))[1]
            quantized: np.ndarray = np.zeros((n, size, size), np.uint16)
        else:  # each map at its image's (bounded) or its model's size: one array per row
            quantized = np.empty(n, object)
            quantized[:] = [np.zeros((1, 1), np.uint16) for _ in range(n)]
        scale = np.zeros(n, np.float64)
        for key in sorted(set(keys.tolist())):
            ok = np.flatnonzero((keys == key) & (status == "ok"))
            if not len(ok):
                continue
            scorer = self.scorer(key)
            if scorer is None:
                status[ok], retryable[ok] = "error", True
                error[ok] = f"model unusable: {self.unusable[key]}"
                continue
            tiled = scorer.tiled
            try:
                if tiled:
                    result = scorer.score_images([images[i] for i in ok])
                elif images.dtype == object:  # a block of several sizes
                    result = scorer.score_batch(np.stack([images[i] for i in ok]))
                else:
                    result = scorer.score_batch(np.ascontiguousarray(images[ok]))
            except Exception as e:  # noqa: BLE001 - e.g. out of GPU memory: retry next run
                logging.getLogger(__name__).exception("scoring a batch of %d failed", len(ok))
                status[ok], retryable[ok] = "error", True
                error[ok] = f"scoring failed: {_describe(e)}"
                continue
            model_id[ok], threshold[ok] = scorer.model_id, _or_nan(scorer.threshold)
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
            "model_id": model_id,
            "threshold": threshold,
        }


def _or_nan(threshold: float | None) -> float:
    return float("nan") if threshold is None else float(threshold)


def write_maps_batch(
    batch: dict[str, np.ndarray],
    maps_root: str,
    run_id: str,
    io_threads: int,
    routes: Sequence[str | None] = (),
) -> pa.Table:
    """Write each scored image's map as a 16-bit PNG (a CPU task) and shape the final rows.
    Each row's model id and threshold are those the actor scored it with (`model_id`,
    `threshold` columns; NaN: no threshold); `routes[route_code]` is its route's name."""
    n = len(batch["status"])
    model_ids = [str(m) for m in batch["model_id"]]
    thresholds = np.asarray(batch["threshold"], np.float64)
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
                model_ids[i],
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
    flags = is_anomalous(batch["score"], thresholds)
    no_flag = ~ok | ~np.isfinite(batch["score"]) | np.isnan(thresholds)
    route = [None] * n
    if "route_code" in batch:
        route = [routes[int(c)] for c in batch["route_code"]]
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
            "threshold": pa.array(thresholds, pa.float64(), mask=np.isnan(thresholds)),
            "is_anomalous": pa.array(flags, pa.bool_(), mask=no_flag),
            "map_uri": pa.array(uris, pa.string()),
            "map_scale": pa.array(batch["map_scale"], pa.float64(), mask=~ok),
            "map_width": pa.array(
                [q.shape[1] for q in batch["map_q"]], pa.int32(), mask=map_missing
            ),
            "map_height": pa.array(
                [q.shape[0] for q in batch["map_q"]], pa.int32(), mask=map_missing
            ),
            "model_id": pa.array(model_ids, pa.string()),
            "route": pa.array(route, pa.string()),
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
