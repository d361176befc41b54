"""The `dskd` command: its commands registered in the order `--help` lists them, and `main`,
which turns every way a command can end into one line on stderr and an exit code."""

from __future__ import annotations

import sys
import traceback

import typer

try:  # typer ≥ 0.2x vendors click; older ones use the click package
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

from dskd_ray.cli import evaluate, export, nightly, train
from dskd_ray.cli.console import is_verbose
from dskd_ray.cli.exits import INTERRUPTED, hook_exit, interrupted_line, set_exit_code
from dskd_ray.errors import DSKDError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="DSKD anomaly detection: learn normal from defect-free images, find the defects.",
)
app.command("make-demo-data")(train.make_demo_data_cmd)
app.command()(train.train)
app.command()(evaluate.evaluate)
app.command()(evaluate.predict)
app.command()(train.demo)
app.command()(nightly.score)
app.command()(export.export)
app.command()(nightly.results)


def main() -> None:
    """Entry point: usage errors, DSKDError and storage failures become one line on stderr and
    exit code 2 / 1 (with --verbose, after the traceback)."""
    hook_exit()  # once, before any hook a command registers
    try:
        _main()
        set_exit_code(0)
    except SystemExit as e:
        set_exit_code(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
        raise


def _main() -> None:
    try:
        # Without standalone mode typer *returns* the code of an Exit it caught, and it turns
        # Ctrl-C (KeyboardInterrupt) into Exit(130): a returned code is the run's own.
        code = app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("dskd: aborted", err=True)
        sys.exit(130)
    except click_errors.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            typer.echo(e.ctx.get_help() if e.ctx else "see 'dskd --help'", err=True)
            sys.exit(2)
        command = e.ctx.command_path if e.ctx else "dskd"
        typer.echo(f"dskd: error: {e.format_message()} (see '{command} --help')", err=True)
        sys.exit(2)
    except DSKDError as e:
        _fail(e, str(e))
    except FileExistsError as e:
        _fail(e, str(e))
    except KeyboardInterrupt:
        _interrupted()
    except Exception as e:
        from dskd_ray.io.storage import describe_failure, is_storage_failure

        if not is_storage_failure(e):
            raise
        # A storage failure the library did not name a URI for: still one line.
        _fail(e, f"storage failure: {describe_failure(e)}")
    if code == INTERRUPTED:
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


def _interrupted() -> None:
    """Ctrl-C: one line, and the shell's code for it, so `dskd train … && dskd export …` stops."""
    typer.echo(interrupted_line(), err=True)
    sys.exit(INTERRUPTED)


def _fail(error: BaseException, message: str) -> None:
    """One line on stderr and exit 1; with --verbose the traceback first."""
    if is_verbose():
        traceback.print_exception(error, file=sys.stderr)
    typer.echo(f"dskd: error: {message}", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
