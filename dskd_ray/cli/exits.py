"""How `dskd` leaves: the exit code it ends with, whatever a native library does at teardown,
and the one line a Ctrl-C prints."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C ended

_exit_code = 1  # what the process exits with if `main` never reaches its end
_exit_hooked = False
_interrupt_note = ""  # set by a command that can say what an interruption leaves behind


def _exit_before_native_teardown() -> None:
    """The last exit hook (`main` registers it first; they run last-in, first-out): the other
    hooks (Ray's shutdown, temporary files, child processes) have run; flush and leave, skipping
    the interpreter's and the C++ libraries' teardown. There, Arrow's or ONNX Runtime's thread
    pools can be destroyed with a worker still alive, which aborts a run that had already
    committed everything ("terminate called without an active exception", exit -6; seen on a
    `dskd score --dry-run`, apache/arrow#34314)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(_exit_code)


def hook_exit() -> None:
    """Register the last exit hook: once, before any hook a command registers."""
    global _exit_hooked
    if not _exit_hooked:
        atexit.register(_exit_before_native_teardown)
        _exit_hooked = True


def set_exit_code(code: int) -> None:
    """The code the last exit hook leaves with."""
    global _exit_code
    _exit_code = code


def note_interruption(note: str) -> None:
    """What a Ctrl-C from here on leaves behind, added to the line it prints."""
    global _interrupt_note
    _interrupt_note = note


def interrupted_line() -> str:
    return f"dskd: interrupted{_interrupt_note}"
