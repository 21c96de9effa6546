"""One exception family for everything a user can cause, each with its own exit code.

The CLI maps every :class:`DfqError` to one line on stderr and the class's ``exit_code``; anything
else is a bug in dfq-deploy and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import signal


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none): what a
    one-line error or warning quotes from a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class DfqError(Exception):
    """Base class of errors caused by input, environment or a failed quality gate."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class BadInputError(DfqError):
    """A model file, flag, shape, path or data folder is wrong."""

    exit_code = 2


class MissingDependencyError(DfqError):
    """An optional package is needed for what was asked."""

    exit_code = 3

    def __init__(self, package: str, *, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed",
            hint=f'pip install "dfq-deploy[{extra}]"',
        )
        self.package = package
        self.extra = extra


class ExportError(DfqError):
    """The quantized model could not be written as a valid ONNX graph."""

    exit_code = 4


class EngineBuildError(DfqError):
    """A runtime (TensorRT, onnxruntime) refused the graph."""

    exit_code = 5


class FidelityGateError(DfqError):
    """The deployed model disagrees with its reference more than allowed."""

    exit_code = 6


class BudgetNotMetError(DfqError):
    """No precision plan meets the requested accuracy budget."""

    exit_code = 7


class RegressionError(DfqError):
    """``dfq-deploy compare``: the new report is worse than the old one beyond the given thresholds."""

    exit_code = 8


class EngineRuntimeError(DfqError):
    """A built engine failed to load or run: deserialization, execution context, input shape, execution."""

    exit_code = 9


class RemoteError(DfqError):
    """A remote device could not be reached or used: SSH connection or authentication, a missing tool
    on the device, a remote command that failed, a connection that dropped."""

    exit_code = 10


class QualityGateError(DfqError):
    """A build's measured quality gate failed (``--min-top1``, ``--max-latency-ms``,
    ``--max-drop-measured``); the report is still written."""

    exit_code = 11


class StorageError(DfqError):
    """The file system refused a read or write: no space left, permission denied, read-only, path too long."""

    exit_code = 12

    @classmethod
    def from_os_error(
        cls, exc: OSError, *, path: str | os.PathLike | None = None, action: str = "access"
    ) -> StorageError:
        """One line with the path, the errno text and what to do about that errno."""
        where = path if path is not None else (exc.filename or "a file")
        if exc.filename2 is not None and path is None:
            where = f"{exc.filename} -> {exc.filename2}"
        reason = exc.strerror or str(exc) or type(exc).__name__
        return cls(
            f"cannot {action} {where}: {reason}",
            hint=_STORAGE_HINTS.get(exc.errno, "check the path, its permissions and the disk"),
        )


_STORAGE_HINTS = {
    errno.ENOSPC: "free space on that disk, or point --out (or $DFQ_DEPLOY_CACHE for the cache) elsewhere",
    errno.EDQUOT: "your disk quota is used up: free some of it, or point --out elsewhere",
    errno.EACCES: "you lack permission there: choose a folder you can write to (--out DIR)",
    errno.EPERM: "the operation is not permitted there: choose a folder you own (--out DIR)",
    errno.EROFS: "that file system is mounted read-only: choose a writable folder (--out DIR)",
    errno.ENAMETOOLONG: "the path is longer than the file system allows: use a shorter --out or file name",
    errno.EIO: "the disk reported an I/O error: check the device (dmesg) before retrying",
}


class LockedError(DfqError):
    """Another build holds the lock on the output folder (or a cache entry)."""

    exit_code = 13


# Not DfqErrors: a build stopped by a signal exits as shells expect (128 + signal number).
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwinds like Ctrl-C (``finally`` blocks remove temp files) and
    records the pipeline stage it stopped, so the CLI can say where."""

    def __init__(self, signum: int, stage: str | None = None):
        super().__init__(signum)
        self.signum = signum
        self.stage = stage

    @property
    def exit_code(self) -> int:
        return EXIT_SIGTERM if self.signum == signal.SIGTERM else EXIT_SIGINT


EXIT_CODES = {
    cls.__name__: cls.exit_code
    for cls in (
        DfqError,
        BadInputError,
        MissingDependencyError,
        ExportError,
        EngineBuildError,
        FidelityGateError,
        BudgetNotMetError,
        RegressionError,
        EngineRuntimeError,
        RemoteError,
        QualityGateError,
        StorageError,
        LockedError,
    )
}
