"""What is left to score: the listing against this model's index (`_plan`: skipped,
to score, gone), and the dry run that reports it without scoring (`dry_run`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dskd_ray.config import ScoringOptions
from dskd_ray.errors import CheckpointError
from dskd_ray.io.storage import canonical_uri, check_schemes, check_writable, uri_scheme
from dskd_ray.io.storage_listing import check_output
from dskd_ray.nightly.listing import _Listing, list_inputs
from dskd_ray.nightly.results import (
    RESULT_SCHEMA,
    gone_rows,
)
from dskd_ray.nightly.run_index import ModelIndex, hash_rows, member

log = logging.getLogger(__name__)


@dataclass
class _Plan:
    """Tonight's work: what is listed, what this model already did, what is left."""

    listing: _Listing
    done: np.ndarray | None  # per listed image: already scored by this model (None: nothing is)
    skipped: int
    gone: pa.Table  # RESULT_SCHEMA rows saying "gone", already stamped with the run id
    index: ModelIndex  # this model's latest row per image before this run

    @property
    def to_score(self) -> pa.Table:
        """LISTING_SCHEMA: the listed images left to score (a copy: made once, by the run)."""
        table = self.listing.table
        return table if self.done is None else table.filter(pa.array(~self.done))


def _plan(
    input_uri: str,
    output: str,
    model_id: str,
    run_id: str,
    rescore: bool,
    schemes: tuple[str, ...] = (),
) -> _Plan:
    # The model's latest row per image, from its compact index (run_index): hashes, 21 bytes an
    # image, read before the listing arrives. The done keys are 64-bit hashes: the driver never
    # holds a key string per image beside the listing itself.
    index = ModelIndex.load(output, model_id)
    finished = index.done_keys() if len(index) and not rescore else None
    listing = list_inputs(input_uri, output, schemes)
    table = listing.table
    done = None
    if finished is not None and table.num_rows:
        done = np.concatenate(
            [
                member(hash_rows([b["image_uri"], b["image_version"]]), finished)
                for b in table.to_batches()
            ]
        )
    del finished
    if listing.manifest or not len(index):  # absent from a manifest is not gone
        gone = RESULT_SCHEMA.empty_table()
    else:
        listed = hash_rows([listing.table["image_uri"]])
        listed.sort()  # in place (`member` needs it sorted, not unique)
        prefix = canonical_uri(input_uri)
        missing = index.missing(listed, prefix)  # strings read only for what is not listed
        gone = gone_rows(missing, pa.array([], pa.string()), prefix, model_id, run_id)
    skipped = int(done.sum()) if done is not None else 0
    log.info(
        "listed %d images in %s; %d already scored; %d to score",
        listing.table.num_rows,
        input_uri,
        skipped,
        listing.table.num_rows - skipped,
    )
    return _Plan(listing, done, skipped, gone, index)


@dataclass
class DryRunSummary:
    """What `score_images` would do tonight; nothing was read, scored or written."""

    model_id: str
    listed: int
    listed_bytes: int  # of the images listed whose size is known (a manifest may not say)
    skipped: int  # already scored by this model
    to_score: int
    to_score_bytes: int
    unknown_bytes: int  # images to score whose size the manifest did not give
    gone: int  # would get a "gone" row
    other_files: int
    seconds: float  # in all, the model's id (a checkpoint load) included
    listing_seconds: float = 0.0  # listing, then the diff against what is done

    def format(self) -> str:
        return (
            f"dry run: listed {self.listed} ({_bytes(self.listed_bytes)}), "
            f"skipped {self.skipped} (already scored), to score {self.to_score} "
            f"({_sized(self.to_score_bytes, self.unknown_bytes)}), gone {self.gone}, "
            f"other files {self.other_files}; {self.seconds:.1f} s (listing and diff "
            f"{self.listing_seconds:.1f} s); nothing scored or written"
        )


def _sized(n: int, unknown: int) -> str:
    return f"{_bytes(n)}; size unknown for {unknown}" if unknown else _bytes(n)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def dry_run(
    input_uri: str, model: str, output: str, options: ScoringOptions | None = None
) -> DryRunSummary:
    """List, diff against what this model already scored, and count; score and write nothing.

    The model id comes from the checkpoint's header (`checkpoint_header`): no torch, no weights
    read, so the driver holds the listing and the index and little else."""
    from dskd_ray.model.checkpoint_header import read_model_id

    options = options or ScoringOptions()
    options.validate()
    # The scheme first: resolving INPUT's filesystem (check_output) may already connect.
    check_schemes({uri_scheme(input_uri)}, options.schemes, f"INPUT {input_uri}")
    check_output(input_uri, output)
    check_writable(output)  # what the real run would find only after scoring every image
    start = time.perf_counter()
    try:
        model_id = read_model_id(model)
    except CheckpointError:  # the full load is the authority: its error, as the run would say it
        model_id = None
    if model_id is None:  # a file from before ids were stored: the full load computes it
        from dskd_ray.model.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(model)
        checkpoint.require_finished(model)
        model_id = checkpoint.model_id
    listing_start = time.perf_counter()
    plan = _plan(input_uri, output, model_id, "dry-run", options.rescore, options.schemes)
    listed_sizes = plan.listing.table["image_bytes"]
    # Counted through the mask: the dry run never copies the rows left to score.
    sizes = listed_sizes if plan.done is None else listed_sizes.filter(pa.array(~plan.done))
    known = pc.greater_equal(sizes, 0)
    return DryRunSummary(
        model_id=model_id,
        listed=plan.listing.table.num_rows,
        listed_bytes=int(pc.sum(pc.max_element_wise(listed_sizes, 0)).as_py() or 0),
        skipped=plan.skipped,
        to_score=len(sizes),
        to_score_bytes=int(pc.sum(sizes.filter(known)).as_py() or 0),
        unknown_bytes=len(sizes) - int(pc.sum(known).as_py() or 0),
        gone=plan.gone.num_rows,
        other_files=plan.listing.stats.other_files,
        seconds=time.perf_counter() - start,
        listing_seconds=time.perf_counter() - listing_start,
    )
