"""A batch that kills the process scoring it, twice, is scored one image at a time; an image
that kills it twice on its own gets an error row. No Ray here: `ScoringActor` wraps its call.

A dead scoring actor is restarted by Ray, which runs its batch again on the new one (forever, by
default). The new process remembers nothing, so each attempt is written down on the node's own
disk before it starts and removed when it finishes: an attempt file still there when the batch
comes back is an attempt that died. Two, and the batch is split to single images, each counted
the same way. Cost: one small file written and one removed per batch.

The count lives on the node that scored the batch; Ray restarts an actor where it can, usually
the same node. One restarted on another node starts counting again there, so on a cluster a
batch may kill up to four actors per node before its culprit is found: more deaths, never an
endless loop. (A cap on Ray's own retries would need `map_batches(**ray_remote_args)`, which Ray
2.60 deprecates for removal in 2.64.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEATHS_ALLOWED = 2  # attempts that may die before a batch is split, or an image given up


def batch_key(uris: np.ndarray, versions: np.ndarray) -> str:
    text = "\n".join(f"{u}\0{v}" for u, v in zip(uris, versions, strict=True))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class Attempts:
    """Attempts started on `folder`'s node and never finished, per key."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def unfinished(self, key: str) -> int:
        try:
            return int(json.loads(self._path(key).read_text())["attempts"])
        except (OSError, ValueError, KeyError):
            return 0

    def begin(self, key: str, images: list[str]) -> int:
        """Record one more attempt; returns how many had died before it."""
        died = self.unfinished(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._path(key).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"attempts": died + 1, "images": images}))
        tmp.replace(self._path(key))
        return died

    def end(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


Batch = dict[str, np.ndarray]


def score_guarded(
    batch: Batch,
    score: Callable[[Batch], Batch],
    attempts: Attempts,
    give_up: Callable[[Batch, str], Batch],
) -> Batch:
    """`score(batch)`, counted in `attempts`. A batch whose attempts died DEATHS_ALLOWED times
    is scored image by image; an image whose own attempts died as often is `give_up(one, why)`
    (its error row) instead."""
    uris, versions = batch["image_uri"], batch["image_version"]
    key = batch_key(uris, versions)
    if attempts.unfinished(key) < DEATHS_ALLOWED:
        return _counted(key, [str(u) for u in uris], lambda: score(batch), attempts)
    log.warning(
        "a batch of %d images (first %s) killed the scoring process %d times: scoring it one "
        "image at a time",
        len(uris), uris[0], DEATHS_ALLOWED,
    )  # fmt: skip
    rows = []
    for i in range(len(uris)):
        one = {name: values[i : i + 1] for name, values in batch.items()}
        one_key = batch_key(uris[i : i + 1], versions[i : i + 1])
        deaths = attempts.unfinished(one_key)
        if deaths >= DEATHS_ALLOWED:
            log.error("%s killed the scoring process %d times: an error row", uris[i], deaths)
            rows.append(give_up(one, f"the scoring process died {deaths} times scoring it"))
        else:
            rows.append(_counted(one_key, [str(uris[i])], lambda one=one: score(one), attempts))
    return {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}


def _counted(key: str, images: list[str], run: Callable[[], Batch], attempts: Attempts) -> Batch:
    died = attempts.begin(key, images)
    if died:
        log.warning("scoring %d image(s) again after %d attempt(s) died", len(images), died)
    try:
        result = run()
    except BaseException:  # an exception is not a death: the next attempt starts afresh
        attempts.end(key)
        raise
    attempts.end(key)
    return result
