"""`decode_image` in a process of its own, so that an image which crashes the decoder costs
one error row, not the worker that decoded it (and with it a batch, or a whole run).

Image libraries are native code: a crafted or damaged file can segfault one, and a large one
can get its process killed for memory. Decoded in the scoring job's own worker, such an image
kills the worker; Ray runs the batch again, it dies again, without end. Here a long-lived child
process decodes one image at a time for its parent (one child per decoding process, started on
first use, reading from its parent until the parent goes away). When the child dies, the image
it was decoding is known exactly: it is tried once more in a new child, and an image that kills
that one too raises `DecoderCrashed`, which the caller turns into the image's error row.

    parent ── size, image bytes ──► child: decode_image(bytes, size)
           ◄── status, width, height, pixels (or the error's text) ──

The child imports only numpy and Pillow (0.23 s to its first answer, overlapped with the first
reads). The round trip adds 0.1–0.8 ms an image, 3–5% of decoding a 1024² JPEG or PNG
(`bench/decode_supervision.py`, docs/design.md §6).
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import logging
import signal
import struct
import subprocess
import sys
import threading

import numpy as np

log = logging.getLogger(__name__)

_REQUEST = struct.Struct("<II")  # size (0: full size), image byte count
_REPLY = struct.Struct("<BiiIII")  # status, width, height, rows, columns, payload byte count
_OK, _DECODE_ERROR, _MEMORY_ERROR, _OTHER_ERROR = range(4)
_READY = b"R"
_shared: DecoderProcess | None = None


def shared_decoder() -> DecoderProcess:
    """This process's decoder process (one per process, as a Ray worker runs task after task)."""
    global _shared
    if _shared is None:
        _shared = DecoderProcess()
        atexit.register(_shared.close)
    _shared.start()  # its imports overlap the caller's first reads
    return _shared


class DecoderCrashed(Exception):
    """A decoder process died on this image twice, in a new process each time."""

    def __init__(self, signal_number: int | None, exit_code: int) -> None:
        self.signal_number = signal_number
        self.exit_code = exit_code
        how = _death(signal_number, exit_code)
        super().__init__(
            f"decoder crashed: {how} on this image, twice, in a new decoder process each time"
        )

    @property
    def retryable(self) -> bool:
        """SIGKILL is what the kernel's OOM killer sends: with more memory free, it may pass."""
        return self.signal_number == signal.SIGKILL


class DecoderUnavailable(RuntimeError):
    """The decoder process could not start (not an image's fault): the task fails loudly."""


def _widen(fd: int, size: int = 1 << 20) -> None:
    """A pipe of `size` bytes where Linux allows it (the default 64 KB makes a 2 MB image 32
    round trips between the two processes)."""
    import fcntl

    # Above /proc/sys/fs/pipe-max-size, or not Linux: the default stays.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)


def _death(signal_number: int | None, exit_code: int) -> str:
    if signal_number is None:
        return f"exited with code {exit_code}"
    try:
        name = signal.Signals(signal_number).name
    except ValueError:
        name = "unknown signal"
    hint = ": out of memory?" if signal_number == signal.SIGKILL else ""
    return f"killed by signal {signal_number} ({name}{hint})"


class _Died(Exception):
    def __init__(self, signal_number: int | None, exit_code: int) -> None:
        super().__init__(_death(signal_number, exit_code))
        self.signal_number = signal_number
        self.exit_code = exit_code


class DecoderProcess:
    """A child process that runs `decode_image`; `decode` has its signature and errors.

    Thread-safe (one image at a time). The child starts on the first `decode` and is replaced
    whenever it dies; `close` ends it (it also ends by itself when this process does).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ready = False

    def decode(self, data: bytes, size: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
        """`images.decode_image(data, size)`, run in the child. Raises what it raises
        (ImageDecodeError, MemoryError, another built-in exception, else a RuntimeError naming
        it), or DecoderCrashed when the child died on these bytes twice."""
        with self._lock:
            try:
                return self._request(data, size)
            except _Died as first:
                log.warning("the decoder process died (%s) on an image: trying it again", first)
            try:
                return self._request(data, size)
            except _Died as second:
                raise DecoderCrashed(second.signal_number, second.exit_code) from None

    def start(self) -> None:
        """Start the child now rather than on the first `decode` (a no-op if it runs)."""
        with self._lock:
            self._start()

    def close(self) -> None:
        with self._lock:
            self._stop()

    # --- the parent's side ---------------------------------------------------------------------

    def _start(self) -> subprocess.Popen:
        if self._proc is None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "dskd_ray.io.decoder_process"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                # stderr: the parent's (a Ray worker's log), where a crash's traceback lands
            )
            self._ready = False
            for stream in (self._proc.stdin, self._proc.stdout):
                _widen(stream.fileno())
        return self._proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _request(self, data: bytes, size: int | None) -> tuple[np.ndarray, tuple[int, int]]:
        proc = self._start()
        try:
            if not self._ready:
                if proc.stdout.read(1) != _READY:
                    raise EOFError
                self._ready = True
            proc.stdin.write(_REQUEST.pack(size or 0, len(data)))
            proc.stdin.write(data)
            proc.stdin.flush()
            header = proc.stdout.read(_REPLY.size)
            if len(header) != _REPLY.size:
                raise EOFError
            status, width, height, rows, columns, length = _REPLY.unpack(header)
            payload = proc.stdout.read(length)
            if len(payload) != length:
                raise EOFError
        except (EOFError, BrokenPipeError, ConnectionResetError):
            was_ready = self._ready
            self._stop()
            code = proc.returncode
            if not was_ready:
                raise DecoderUnavailable(
                    f"the decoder process {_death(-code if code < 0 else None, code)} before "
                    "it was ready (its error is in this worker's log)"
                ) from None
            raise _Died(-code if code < 0 else None, code) from None
        if status == _OK:
            image = np.frombuffer(payload, np.uint8).reshape(rows, columns, 3)
            return image, (width, height)
        from dskd_ray.io.images import ImageDecodeError

        text = payload.decode("utf-8", "replace")
        if status == _DECODE_ERROR:
            raise ImageDecodeError(text)
        if status == _MEMORY_ERROR:
            raise MemoryError(text)
        raise _rebuilt(text)


def _rebuilt(text: str) -> Exception:
    """The child's "<Type>: <message>" as that built-in exception where it is one, so the
    caller's error text reads as if it had decoded in process."""
    name, _, message = text.partition(": ")
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception) and message:
        try:
            return kind(message)
        except Exception:  # noqa: BLE001 - a type that wants other arguments
            pass
    return RuntimeError(text)


# --- the child's side ------------------------------------------------------------------------


def _read_exactly(stream, n: int) -> bytes:  # noqa: ANN001 - a binary stream
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _serve() -> None:
    """Decode requests from stdin until it closes (the parent has finished, or died)."""
    import faulthandler

    from dskd_ray.io.images import ImageDecodeError, decode_image

    faulthandler.enable()  # a crash's Python traceback goes to stderr, the parent's log
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(_READY)
    stdout.flush()
    while True:
        try:
            size, length = _REQUEST.unpack(_read_exactly(stdin, _REQUEST.size))
            data = _read_exactly(stdin, length)
        except EOFError:
            return
        try:
            image, (width, height) = decode_image(data, size or None)
            image = np.ascontiguousarray(image, np.uint8)
            reply = (_OK, width, height, image.shape[0], image.shape[1]), image.data.cast("B")
        except ImageDecodeError as e:
            reply = (_DECODE_ERROR, -1, -1, 0, 0), str(e).encode()
        except MemoryError as e:
            reply = (_MEMORY_ERROR, -1, -1, 0, 0), str(e).encode()
        except Exception as e:  # noqa: BLE001 - a decoder bug on odd bytes: the caller says so
            text = str(e) or type(e).__name__
            text = text if type(e).__name__ in text else f"{type(e).__name__}: {text}"
            reply = (_OTHER_ERROR, -1, -1, 0, 0), text.encode()
        del data
        (status, width, height, rows, columns), payload = reply
        stdout.write(_REPLY.pack(status, width, height, rows, columns, len(payload)))
        stdout.write(payload)
        stdout.flush()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):  # the parent went away
        _serve()
