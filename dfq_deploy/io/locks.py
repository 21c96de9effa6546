"""Exclusive locks on output folders and cache entries, as git and package managers take them.

A lock is ``fcntl.flock`` on a small file that names its holder (pid, host, start time, command).
The kernel drops a flock when its process dies, however it dies, so a lock left by a killed build
is simply free: the next build takes it over and says so. A released lock file is removed, so it
never counts as an artifact and a refused build still leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from dfq_deploy.errors import LockedError, StorageError
from dfq_deploy.io.artifacts import prepare_out_dir, remove_stale_temp_files

OUT_DIR_LOCK = ".dfq-deploy.lock"


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a lock."""

    pid: int
    host: str
    started: str
    command: str

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
            command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
        )

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started} ({self.command})"


class StaleLockWarning(UserWarning):
    """A lock file was left by a process that died holding it; it was taken over."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, what: str, wait: bool = False) -> Iterator[LockHolder | None]:
    """Hold an exclusive lock on ``path`` (a lock file, created if needed) for the block.

    Another holder makes this raise :class:`LockedError` naming it, or, with ``wait``, block until
    it is released. Yields the holder of a stale lock taken over (``None`` when the lock was free).
    ``what`` names the locked thing in messages ("output folder build/").
    """
    path = Path(path)
    fd = _acquire(path, what=what, wait=wait)
    try:
        stale = _read_holder(
            fd
        )  # a released lock file is removed; one with a holder in it was left by a killed process
        if stale is not None:
            warnings.warn(
                f"took over the lock on {what} left by {stale.describe()}, which is no longer running",
                StaleLockWarning,
                stacklevel=3,
            )
        _write_holder(fd, LockHolder.this_process())
        yield stale
    finally:
        # Unlink while still holding it: a waiter that opened this file notices it is gone and retries.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def _acquire(path: Path, *, what: str, wait: bool) -> int:
    told = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            # The previous holder removed the folder it had created and left empty: make it again.
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as exc:
            raise StorageError.from_os_error(exc, path=path, action="create the lock file") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            who = holder.describe() if holder else "another process"
            if not wait:
                os.close(fd)
                raise LockedError(
                    f"{what} is locked by {who}",
                    hint="wait for it to finish, pass --wait to queue behind it, or write somewhere else",
                ) from None
            if not told:
                print(f"waiting for the lock on {what}, held by {who}", file=sys.stderr)
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            raise StorageError.from_os_error(exc, path=path, action="lock") from exc
        if _is_current(fd, path):
            return fd
        os.close(fd)  # the previous holder removed the file between our open and our flock


def _is_current(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int) -> LockHolder | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
        return LockHolder(**data) if isinstance(data, dict) else None
    except (ValueError, TypeError):  # empty, being written, or not ours: no holder to name
        return None


def _write_holder(fd: int, holder: LockHolder) -> None:
    data = json.dumps(dataclasses.asdict(holder)).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


@contextlib.contextmanager
def locked_out_dir(out_dir: str | os.PathLike, *, wait: bool = False) -> Iterator[Path]:
    """A build's output folder, prepared and locked for the block, so two builds never mix their
    artifacts in one folder (:class:`LockedError` if another build holds it, unless ``wait``).

    Temp files a killed build left are removed once the lock is ours; a folder this call created
    is removed again if the block leaves it empty (refused before its first artifact).
    """
    created = not Path(out_dir).exists()
    out = prepare_out_dir(out_dir)
    try:
        with exclusive_lock(out / OUT_DIR_LOCK, what=f"output folder {out}", wait=wait):
            for folder in (out, *(p for p in out.iterdir() if p.is_dir())):
                remove_stale_temp_files(folder)
            yield out
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            with contextlib.suppress(OSError):  # a build waiting for our lock may have just written into it
                out.rmdir()
