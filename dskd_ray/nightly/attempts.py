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

Where: `<temp dir>/dskd-ray-scratch/run-<run id>/` on each node (`run_scratch`). The name has
hyphens so that it can never be imported: a folder named like the package in the temp directory
would shadow the installed one for anyone whose working directory is the temp directory. A
folder is removed as soon as it is empty (after every batch) and the run's folder whole when
the run ends, well or not; a run killed outright leaves its folder, which the next run on that
node removes once it is a day old.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dskd_ray.io.storage import printable

log = logging.getLogger(__name__)

DEATHS_ALLOWED = 2  # attempts that may die before a batch is split, or an image given up

SCRATCH_DIR = "dskd-ray-scratch"  # in the temp directory; not a Python identifier (see above)
STALE_AFTER_S = 24 * 3600  # a run folder untouched this long was left by a killed run
_OLD_SCRATCH_DIR = "dskd_ray"  # where earlier versions kept it: importable, so tidied away


def scratch_root() -> Path:
    """This node's scratch folder for scoring runs."""
    return Path(tempfile.gettempdir()) / SCRATCH_DIR


def run_scratch(run_id: str) -> Path:
    """One run's attempt counters on this node."""
    return scratch_root() / f"run-{run_id}"


def remove_run_scratch(run_id: str, linger_s: float = 0.0) -> None:
    """Remove a run's folder on this node, and the scratch folder if nothing else is in it.

    `linger_s`: for a run stopped early. Its actors are being killed, and one may start a batch
    it had already been sent (writing its attempt) in the moments before the kill lands: the
    folder is removed again, every 0.1 s, for that long.
    """
    deadline = time.monotonic() + linger_s
    while True:
        shutil.rmtree(run_scratch(run_id), ignore_errors=True)
        _remove_empty(scratch_root())
        if time.monotonic() >= deadline:
            return
        time.sleep(0.1)


def clean_stale_scratch(max_age_s: float = STALE_AFTER_S, now: float | None = None) -> list[Path]:
    """Remove the run folders on this node untouched for `max_age_s` (left by runs that were
    killed: a live run touches its folder with every batch); returns what was removed.

    Also removes the empty folders older versions left as `<temp dir>/dskd_ray/run-*/scoring`
    (empty ones only: a folder of that name with anything else in it is not ours to delete).
    """
    now = time.time() if now is None else now
    removed = []
    root = scratch_root()
    try:
        entries = list(os.scandir(root))
    except OSError:
        entries = []
    for entry in entries:
        try:
            stale = entry.name.startswith("run-") and now - entry.stat().st_mtime > max_age_s
        except OSError:
            continue
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    _remove_empty(root)
    old = root.parent / _OLD_SCRATCH_DIR
    for run in old.glob("run-*") if old.is_dir() else []:
        _remove_empty(run / "scoring")
        _remove_empty(run)
    _remove_empty(old)
    return removed


def _remove_empty(folder: Path) -> bool:
    try:
        folder.rmdir()
        return True
    except OSError:  # not empty, not there, not ours
        return False


def batch_key(uris: np.ndarray, versions: np.ndarray) -> str:
    text = "\n".join(f"{u}\0{v}" for u, v in zip(uris, versions, strict=True))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class Attempts:
    """Attempts started on `folder`'s node and never finished, per key.

    `tidy`: folders (innermost first) removed when an attempt ends and leaves them empty.
    """

    def __init__(self, folder: str | os.PathLike, tidy: tuple[Path, ...] = ()) -> None:
        self.folder = Path(folder)
        self.tidy = tidy

    @classmethod
    def for_run(cls, run_id: str) -> Attempts:
        """A run's attempts on this node, in its scratch folder, tidied as they end."""
        folder = run_scratch(run_id)
        return cls(folder, tidy=(folder, folder.parent))

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
        tmp = self._path(key).with_suffix(f".{os.getpid()}.tmp")
        for tries in range(1, 4):
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                tmp.write_text(json.dumps({"attempts": died + 1, "images": images}))
                break
            except FileNotFoundError:  # another actor's `end` removed the empty folder
                if tries == 3:
                    raise
        tmp.replace(self._path(key))
        return died

    def end(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        for folder in self.tidy:
            if not _remove_empty(folder):
                break


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
        len(uris), printable(str(uris[0])), DEATHS_ALLOWED,
    )  # fmt: skip
    rows = []
    for i in range(len(uris)):
        one = {name: values[i : i + 1] for name, values in batch.items()}
        one_key = batch_key(uris[i : i + 1], versions[i : i + 1])
        deaths = attempts.unfinished(one_key)
        if deaths >= DEATHS_ALLOWED:
            log.error(
                "%s killed the scoring process %d times: an error row",
                printable(str(uris[i])),
                deaths,
            )
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
