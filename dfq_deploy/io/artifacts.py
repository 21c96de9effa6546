"""Writing artifacts safely and describing them: atomic writes, content hashes, package versions."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from dfq_deploy.errors import BadInputError, StorageError
from dfq_deploy.io.interrupts import fault_point


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path`` and rename it into place.

    A failure leaves no half-written file behind: the temp file is removed and ``path`` untouched.
    The file system refusing (disk full, read-only, permission, name too long) is a
    :class:`StorageError` naming ``path``.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise StorageError.from_os_error(exc, path=path, action="write") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; artifacts get the usual mode
        fault_point(f"write {path.name}")  # a test's kill between the write and the rename
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise StorageError.from_os_error(exc, path=path, action="write") from exc
    except BaseException:
        _discard(tmp)
        raise
    return path


TEMP_SUFFIX = ".tmp"  # what atomic writes leave behind only when their process is killed


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files and folders a killed writer left in ``directory``.

    Only safe while holding the directory's lock (:mod:`dfq_deploy.io.locks`): a live writer's temp
    file looks the same.
    """
    removed = []
    for leftover in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions(
    names: tuple[str, ...] = (
        "dfq-deploy",
        "torch",
        "torchvision",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "onnx-graphsurgeon",
        "tensorrt",
        "tensorrt-rtx",
        "numpy",
    ),
) -> dict[str, str]:
    """Installed versions of the packages that shape an artifact (missing ones are left out)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` (or check an existing one) and prove it is writable before any work."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".dfq-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except (NotADirectoryError, FileExistsError) as exc:  # the path itself is wrong, not the file system
        raise BadInputError(
            f"cannot write to output folder {out}: {exc.strerror or exc}",
            hint="choose a writable folder with --out DIR",
        ) from None
    except OSError as exc:
        raise StorageError.from_os_error(exc, path=out, action="write to output folder") from None
    return out
