"""How every ``dfq-deploy`` command ends on an error: one line, a hint and a documented exit code."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import click

from dfq_deploy.errors import EXIT_SIGINT, DfqError, RemoteError, StorageError


def run_reporting_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn DfqError into one line on stderr and its exit code; --verbose keeps the traceback.

    The last line of defence for the environment: an OSError no stage turned into a StorageError
    is one (exit 12), and SIGINT/SIGTERM end the command with one line and exit 130/143.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dfq_deploy.io.interrupts import interrupt_on_signals

        verbose = kwargs.pop("verbose", False)
        try:
            with interrupt_on_signals(), warnings.catch_warnings():
                if not verbose:
                    warnings.showwarning = _one_line_warning
                return fn(*args, **kwargs)
        except (DfqError, OSError) as exc:
            if verbose:
                raise
            _fail(exc if isinstance(exc, DfqError) else _os_error(exc))
        except KeyboardInterrupt as exc:
            stage = getattr(exc, "stage", None)
            click.echo(f"interrupted{f' at stage {stage}' if stage else ''}; nothing half-written", err=True)
            sys.exit(getattr(exc, "exit_code", EXIT_SIGINT))

    return click.option("--verbose", "-v", is_flag=True, help="Show full tracebacks on errors.")(wrapper)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def _os_error(exc: OSError) -> DfqError:
    if isinstance(exc, ConnectionError):
        return RemoteError(f"connection failed: {exc.strerror or exc}", hint="check the network and the device")
    return StorageError.from_os_error(exc)


def _fail(exc: DfqError) -> None:
    click.echo(f"error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"  hint: {exc.hint}", err=True)
    sys.exit(exc.exit_code)
