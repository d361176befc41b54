"""What `dskd` prints: logging set up per --verbose, plain lines, and the training progress bar."""

from __future__ import annotations

import logging
import sys

import typer

from dskd_ray.progress import PROGRESS

# Set by each command's --verbose: `main` then shows the traceback behind a one-line error.
_verbose = False


def setup_logging(verbose: bool = False) -> None:
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="dskd: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("dskd_ray").setLevel(logging.INFO if verbose else logging.WARNING)
    # Progress lines (an epoch, every ~10 s of scoring, a chunk of evaluation): to stdout when it
    # is not a terminal, so a redirected run leaves a log (a terminal has the bar); to stderr
    # with the rest under --verbose.
    progress = logging.getLogger(PROGRESS.name)
    for handler in [h for h in progress.handlers if getattr(h, "dskd_stdout", False)]:
        progress.removeHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = verbose
    if not sys.stdout.isatty():
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.dskd_stdout = True  # type: ignore[attr-defined]
        progress.addHandler(handler)


def is_verbose() -> bool:
    return _verbose


def echo(msg: str = "") -> None:
    typer.echo(msg)


class ProgressBar:
    """A rich progress bar for training: epoch, loss and images/s."""

    def __init__(self, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn(f"[bold]{label}[/] epoch {{task.fields[epoch]}}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = None

    def __enter__(self) -> ProgressBar:
        return self  # the bar starts with the first step: a run that fails first prints none

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.__exit__(*exc)

    def __call__(self, p: object) -> None:
        total = p.steps * p.epochs  # type: ignore[attr-defined]
        done = (p.epoch - 1) * p.steps + p.step  # type: ignore[attr-defined]
        fields = {
            "epoch": f"{p.epoch}/{p.epochs}",  # type: ignore[attr-defined]
            "loss": f"{p.loss:.4f}",  # type: ignore[attr-defined]
            "ips": f"{p.images_per_s:.1f}",  # type: ignore[attr-defined]
        }
        if self.task is None:
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=total, **fields)
        self.progress.update(self.task, completed=done, total=total, **fields)
