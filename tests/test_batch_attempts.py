"""A batch that kills the process scoring it twice is split; the image that does it is given
up after two deaths of its own. Each attempt runs in a forked process that really dies, and the
test runs it again until it returns, as Ray does with a dead actor's task."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest

from dskd_ray.nightly.attempts import DEATHS_ALLOWED, Attempts, batch_key, score_guarded


def score(batch: dict) -> dict:
    """Scores are the image numbers; image 13 kills the process, like a native crash."""
    if 13 in batch["image"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return {
        **batch,
        "score": batch["image"] * 1.0,
        "status": np.array(["ok"] * len(batch["image"])),
    }


def give_up(batch: dict, why: str) -> dict:
    return {**batch, "score": np.full(len(batch["image"]), np.nan), "status": np.array([why])}


def attempt(batch: dict, folder: Path, out: Path) -> int | None:
    """One attempt in a process of its own: its result, or the signal that killed it."""
    pid = os.fork()
    if pid == 0:  # the child: score and report, then leave without running pytest's exit
        try:
            result = score_guarded(batch, score, Attempts(folder), give_up)
            out.write_bytes(pickle.dumps(result))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None


def run_until_done(batch: dict, tmp_path: Path) -> tuple[dict, int]:
    deaths = 0
    out = tmp_path / "result.pkl"
    while attempt(batch, tmp_path / "attempts", out) is not None:
        deaths += 1
        assert deaths < 10, "retried without end"
    return pickle.loads(out.read_bytes()), deaths


def batch_of(numbers: list[int]) -> dict:
    return {
        "image_uri": np.array([f"/img/{i}.png" for i in numbers], dtype=object),
        "image_version": np.array(["v1"] * len(numbers), dtype=object),
        "image": np.array(numbers),
    }


def test_a_batch_that_kills_its_process_is_split_to_the_image_that_does(tmp_path: Path) -> None:
    result, deaths = run_until_done(batch_of([4, 13, 7, 9]), tmp_path)
    # Twice as a batch, then twice on image 13 alone (4 is scored before it each time).
    assert deaths == 2 * DEATHS_ALLOWED
    assert list(result["image_uri"]) == ["/img/4.png", "/img/13.png", "/img/7.png", "/img/9.png"]
    assert list(result["status"]) == [
        "ok", "the scoring process died 2 times scoring it", "ok", "ok",
    ]  # fmt: skip
    np.testing.assert_array_equal(result["score"][[0, 2, 3]], [4.0, 7.0, 9.0])


def test_a_batch_that_dies_once_is_scored_whole_on_its_retry(tmp_path: Path) -> None:
    folder = tmp_path / "attempts"
    batch = batch_of([1, 2, 3])
    attempts = Attempts(folder)
    key = batch_key(batch["image_uri"], batch["image_version"])
    attempts.begin(key, list(batch["image_uri"]))  # an attempt that never finished: one death
    calls = []
    result = score_guarded(
        batch, lambda b: calls.append(len(b["image"])) or score(b), attempts, give_up
    )
    assert calls == [3] and list(result["status"]) == ["ok"] * 3
    assert not list(folder.iterdir())  # finished: nothing left to count


def test_an_exception_is_not_a_death(tmp_path: Path) -> None:
    attempts = Attempts(tmp_path / "attempts")
    batch = batch_of([1, 2])

    def broken(b: dict) -> dict:
        raise ValueError("a bug, not a crash")

    for _ in range(3):
        with pytest.raises(ValueError, match="a bug"):
            score_guarded(batch, broken, attempts, give_up)
    calls = []
    score_guarded(batch, lambda b: calls.append(len(b["image"])) or score(b), attempts, give_up)
    assert calls == [2]  # still whole: no attempt was counted as dead


# --- the per-node scratch folder (issue 25) ----------------------------------------------------


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp directory of the test's own, as `tempfile.gettempdir()` gives it."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_runs_scratch_cannot_be_imported_and_is_gone_when_its_batches_end(
    temp_dir: Path,
) -> None:
    from dskd_ray.nightly.attempts import SCRATCH_DIR

    first, second = Attempts.for_run("r1"), Attempts.for_run("r1")  # two actors on one node
    assert first.folder.parent == temp_dir / SCRATCH_DIR
    assert not SCRATCH_DIR.isidentifier()  # `import` can never find it from the temp dir
    batch = batch_of([1, 2])
    key = batch_key(batch["image_uri"], batch["image_version"])
    first.begin(key, list(batch["image_uri"]))
    second.begin("other", ["/img/3.png"])
    first.end(key)
    assert first.folder.is_dir()  # the other actor's attempt is still running
    second.end("other")
    assert list(temp_dir.iterdir()) == []  # the last attempt to end leaves nothing behind
    # An attempt that starts after another actor removed the empty folder makes it again.
    score_guarded(batch, score, first, give_up)
    assert list(temp_dir.iterdir()) == []


def test_what_a_killed_run_left_is_cleaned_by_a_later_one_after_a_day(temp_dir: Path) -> None:
    import time

    from dskd_ray.nightly.attempts import clean_stale_scratch, remove_run_scratch, run_scratch

    old, recent = run_scratch("killed"), run_scratch("running")
    for folder in (old, recent):
        Attempts(folder).begin("key", ["/img/1.png"])  # attempts that never ended
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    # Versions before the scratch had its own name left an importable, empty `dskd_ray/`.
    (temp_dir / "dskd_ray" / "run-20260101T000000Z-abcdef" / "scoring").mkdir(parents=True)
    assert clean_stale_scratch() == [old]
    assert not old.exists() and recent.is_dir()
    assert not (temp_dir / "dskd_ray").exists()
    remove_run_scratch("running")  # the run that ends removes its own, and the empty parent
    assert list(temp_dir.iterdir()) == []
    # A `dskd_ray` folder holding anything but empty run folders is someone else's: kept.
    (temp_dir / "dskd_ray").mkdir()
    (temp_dir / "dskd_ray" / "__init__.py").write_text("")
    clean_stale_scratch()
    assert (temp_dir / "dskd_ray" / "__init__.py").exists()
