"""The decoder in a process of its own: the same pixels and errors as `decode_image`, and an
image that kills it (really: SIGSEGV, SIGKILL, brought by tests/crash_hooks) is one error."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dskd_ray.io.decoder_process import DecoderCrashed, DecoderProcess, DecoderUnavailable
from dskd_ray.io.images import ImageDecodeError, decode_image

HOOKS = Path(__file__).resolve().parent / "crash_hooks" / "sitecustomize.py"
MAGIC = b"DSKD-CRASH:"


def encoded(fmt: str, size: tuple[int, int] = (96, 72), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def with_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The crash hooks first on PYTHONPATH of the processes started from now on."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    shutil.copy(HOOKS, hooks / "sitecustomize.py")
    paths = [str(hooks), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    return hooks


def test_same_pixels_sizes_and_errors_as_decoding_in_process() -> None:
    decoder = DecoderProcess()
    try:
        for fmt in ("PNG", "JPEG", "BMP"):
            data = encoded(fmt)
            for size in (64, None):
                got, got_size = decoder.decode(data, size)
                want, want_size = decode_image(data, size)
                assert got_size == want_size == (96, 72)
                assert got.dtype == np.uint8 and np.array_equal(got, want)
        for bad in (b"", b"not an image at all", encoded("PNG")[:200]):
            with pytest.raises(ImageDecodeError) as theirs:
                decode_image(bad, 64)
            with pytest.raises(ImageDecodeError) as ours:
                decoder.decode(bad, 64)
            assert str(ours.value) == str(theirs.value)
    finally:
        decoder.close()


def test_an_image_that_kills_the_decoder_twice_is_an_error_and_the_next_one_decodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = with_hooks(tmp_path, monkeypatch)
    good = encoded("PNG")
    decoder = DecoderProcess()
    try:
        with pytest.raises(DecoderCrashed) as segv:
            decoder.decode(MAGIC + b"segv\n" + good, 64)
        assert str(segv.value) == (
            "decoder crashed: killed by signal 11 (SIGSEGV) on this image, twice, "
            "in a new decoder process each time"
        )
        assert segv.value.signal_number == signal.SIGSEGV and not segv.value.retryable
        np.testing.assert_array_equal(decoder.decode(good, 64)[0], decode_image(good, 64)[0])

        with pytest.raises(DecoderCrashed, match=r"signal 9 \(SIGKILL: out of memory\?\)") as kill:
            decoder.decode(MAGIC + b"kill\n" + good, 64)
        assert kill.value.retryable  # with more memory free, next night it may decode

        # Dies once, then decodes: retried in a new process, it is an image like any other.
        decoder.decode(good, 64)
        pid = decoder._proc.pid
        image, size = decoder.decode(MAGIC + b"once-a\n" + good, 64)
        assert (hooks / "crashed-once-a").exists() and decoder._proc.pid != pid
        assert size == (96, 72) and np.array_equal(image, decode_image(good, 64)[0])
    finally:
        decoder.close()


def test_a_decoder_killed_between_images_is_replaced(tmp_path: Path) -> None:
    decoder = DecoderProcess()
    data = encoded("PNG")
    try:
        decoder.decode(data, 64)
        old = decoder._proc
        os.kill(old.pid, signal.SIGKILL)
        old.wait()
        np.testing.assert_array_equal(decoder.decode(data, 64)[0], decode_image(data, 64)[0])
        assert decoder._proc.pid != old.pid
    finally:
        decoder.close()


def test_a_decoder_that_cannot_start_fails_loudly_not_as_error_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")
    decoder = DecoderProcess()
    with pytest.raises(DecoderUnavailable, match="exited with code 1 before it was ready"):
        decoder.decode(encoded("PNG"), 64)
    decoder.close()


def test_the_decoder_ends_with_the_process_that_started_it(tmp_path: Path) -> None:
    """SIGKILL the parent: its decoder sees its input close and exits; no orphan is left."""
    script = (
        "import io, os, signal, sys\n"
        "from PIL import Image\n"
        "from dskd_ray.io.decoder_process import shared_decoder\n"
        "b = io.BytesIO(); Image.new('RGB', (8, 8)).save(b, format='PNG')\n"
        "decoder = shared_decoder(); decoder.decode(b.getvalue(), 64)\n"
        "print(decoder._proc.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    parent = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    child = int(parent.stdout.split()[0])
    deadline = time.time() + 30
    while Path(f"/proc/{child}").exists() and time.time() < deadline:
        status = (
            Path(f"/proc/{child}/status").read_text() if Path(f"/proc/{child}").exists() else ""
        )
        if "State:\tZ" in status:  # exited; its new parent has not reaped it yet
            break
        time.sleep(0.1)
    assert time.time() < deadline, f"decoder {child} outlived its parent"
