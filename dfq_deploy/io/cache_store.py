"""Verified cache entries: one folder per key whose manifest holds the sha256 of every payload file.

Every cache of dfq-deploy (calibration sets under ``synthesis/``, TensorRT engines beside it) is a
:class:`CacheStore` under :func:`cache_root`. An entry is written into a temp folder, hashed, and
renamed into place under a lock on its key, so a crash never leaves half an entry and two builds
making the same entry make it once. A read verifies the hashes first; an entry that fails to
verify or to load is moved aside into ``.damaged/`` with a one-line warning, and made again.

    store = CacheStore(cache_root() / "engines")
    engine, hit = store.get_or_make(key, make=build_engine, write=save_engine, read=load_engine)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from dfq_deploy.errors import StorageError, first_line
from dfq_deploy.io.artifacts import TEMP_SUFFIX, atomic_write_bytes, sha256_file
from dfq_deploy.io.interrupts import fault_point
from dfq_deploy.io.locks import exclusive_lock

T = TypeVar("T")

ENTRY_MANIFEST = "entry.json"
DAMAGED_DIR = ".damaged"
ENTRY_FORMAT = 1
LOCK_SUFFIX = ".lock"


def cache_root() -> Path:
    """``$DFQ_DEPLOY_CACHE``, else ``$XDG_CACHE_HOME/dfq-deploy``, else ``~/.cache/dfq-deploy``."""
    root = os.environ.get("DFQ_DEPLOY_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dfq-deploy"


class CacheWarning(UserWarning):
    """A cache entry was damaged (and moved aside) or could not be written; the build goes on."""


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One entry on disk, as ``dfq-deploy cache list`` shows it."""

    kind: str
    key: str
    path: Path
    created: float
    size_bytes: int
    meta: dict[str, Any]

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.created)


class CacheStore:
    """The entries of one kind (a folder under the cache root), each verified when read."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    @property
    def kind(self) -> str:
        return self.directory.name

    def path_of(self, key: str) -> Path:
        return self.directory / key[:32]

    def load(self, key: str, read: Callable[[Path], T]) -> T | None:
        """``read(entry_folder)`` after verifying the entry; ``None`` when absent or damaged (then moved aside)."""
        entry = self.path_of(key)
        if not entry.exists():
            return None
        problem = verify_entry(entry, key=key)
        if problem is None:
            try:
                return read(entry)
            except Exception as exc:  # verified bytes that still do not load: a format this version cannot read
                problem = f"does not load: {first_line(exc)}"
        self._move_aside(entry, problem)
        return None

    def save(self, key: str, write: Callable[[Path], None], *, meta: dict[str, Any] | None = None) -> Path:
        """Make the entry for ``key``: ``write(folder)`` fills a temp folder, which is hashed and renamed in."""
        self.directory.mkdir(parents=True, exist_ok=True)
        entry = self.path_of(key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=TEMP_SUFFIX, dir=self.directory))
        try:
            write(tmp)
            manifest = {
                "format": ENTRY_FORMAT,
                "key": key,
                "created": time.time(),
                "files": {
                    name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                    for name in _payload_files(tmp)
                },
                "meta": meta or {},
            }
            atomic_write_bytes(tmp / ENTRY_MANIFEST, json.dumps(manifest, indent=2, default=str).encode())
            if entry.exists():  # damaged and not movable, or made by a writer that held no lock
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        except OSError as exc:
            raise StorageError.from_os_error(exc, path=entry, action="write the cache entry") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return entry

    def get_or_make(
        self,
        key: str,
        *,
        make: Callable[[], T],
        write: Callable[[T, Path], None],
        read: Callable[[Path], T],
        meta: dict[str, Any] | None = None,
    ) -> tuple[T, bool]:
        """(value, hit): the verified entry for ``key``, or ``make()`` it and store it.

        The key is locked while it is made, so a second build wanting the same entry waits for the
        first and then reads it instead of making it again; a lock and temp folder left by a killed
        writer are taken over and removed. An entry that cannot be written (disk
        full, read-only cache) is a warning: the value is still returned.
        """
        found = self.load(key, read)
        if found is not None:
            return found, True
        with self._writing(key):
            found = self.load(key, read)
            if found is not None:
                return found, True
            value = make()
            try:
                self.save(key, lambda folder: write(value, folder), meta=meta)
            except StorageError as exc:
                warnings.warn(f"{exc.message}; going on without caching it", CacheWarning, stacklevel=2)
            return value, False

    def save_once(self, key: str, write: Callable[[Path], None], *, meta: dict[str, Any] | None = None) -> Path:
        """:meth:`save` under the key's lock, unless another writer finished an entry that verifies meanwhile
        (for a value made without holding the lock: by every rank of a ``torchrun`` job, say)."""
        with self._writing(key):
            if self.path_of(key).exists() and verify_entry(self.path_of(key), key=key) is None:
                return self.path_of(key)
            return self.save(key, write, meta=meta)

    @contextlib.contextmanager
    def _writing(self, key: str) -> Iterator[None]:
        """Hold the key's lock (waiting for a live writer, taking a dead one's over) to make its entry."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = self.directory / f"{key[:32]}{LOCK_SUFFIX}"
        with exclusive_lock(lock, what=f"cache entry {self.path_of(key)}", wait=True):
            self._remove_dead_writers_temp(key)
            fault_point("cache_entry")
            yield

    def entries(self) -> list[CacheEntry]:
        """Every entry folder (verified or not), oldest first."""
        found = []
        for path in self._entry_folders():
            manifest = _read_manifest(path) or {}
            created = manifest.get("created")
            found.append(
                CacheEntry(
                    kind=self.kind,
                    key=str(manifest.get("key", path.name)),
                    path=path,
                    created=float(created) if isinstance(created, (int, float)) else path.stat().st_mtime,
                    size_bytes=folder_size(path),
                    meta=manifest.get("meta") or {},
                )
            )
        return sorted(found, key=lambda e: e.created)

    def leftovers(self) -> list[Path]:
        """Moved-aside damaged entries and temp folders of killed writers."""
        if not self.directory.is_dir():
            return []
        damaged = sorted((self.directory / DAMAGED_DIR).glob("*")) if (self.directory / DAMAGED_DIR).is_dir() else []
        return damaged + sorted(self.directory.glob(f".*{TEMP_SUFFIX}"))

    def _entry_folders(self) -> Iterator[Path]:
        if not self.directory.is_dir():
            return iter(())
        return (p for p in sorted(self.directory.iterdir()) if p.is_dir() and not p.name.startswith("."))

    def _remove_dead_writers_temp(self, key: str) -> None:
        # Called holding the key's lock: a temp folder of this key is a killed writer's, never a live one's.
        for tmp in self.directory.glob(f".{self.path_of(key).name}.*{TEMP_SUFFIX}"):
            shutil.rmtree(tmp, ignore_errors=True)

    def _move_aside(self, entry: Path, problem: str) -> None:
        target = self.directory / DAMAGED_DIR / f"{entry.name}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(entry, target)
            where = f"moved it to {target}"
        except OSError:
            shutil.rmtree(entry, ignore_errors=True)
            where = "deleted it"
        warnings.warn(f"cache entry {entry} {problem}; {where} and making it again", CacheWarning, stacklevel=3)


def verify_entry(entry: Path, *, key: str | None = None) -> str | None:
    """What is wrong with an entry folder ("has no manifest", "calibration.pt: sha256 differs"), or None."""
    manifest = _read_manifest(entry)
    if manifest is None:
        return f"has no readable {ENTRY_MANIFEST}"
    if manifest.get("format") != ENTRY_FORMAT or not isinstance(manifest.get("files"), dict):
        return f"has a {ENTRY_MANIFEST} of another format"
    if key is not None and manifest.get("key") != key:
        return "belongs to another key"
    for name, expected in manifest["files"].items():
        path = entry / name
        if not path.is_file():
            return f"is missing {name}"
        if path.stat().st_size != expected.get("bytes"):
            return f"has a truncated or grown {name} ({path.stat().st_size} bytes, expected {expected.get('bytes')})"
        if sha256_file(path) != expected.get("sha256"):
            return f"has a corrupted {name} (sha256 differs from its manifest)"
    return None


def stores(root: str | os.PathLike | None = None) -> list[CacheStore]:
    """One store per kind found under the cache root."""
    root = Path(root) if root is not None else cache_root()
    if not root.is_dir():
        return []
    return [CacheStore(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def remove(path: Path) -> int:
    """Delete an entry (or leftover) folder; returns the bytes freed."""
    size = folder_size(path) if path.is_dir() else path.stat().st_size
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    return size


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _payload_files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name != ENTRY_MANIFEST and not p.name.endswith(TEMP_SUFFIX)
    )


def _read_manifest(entry: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((entry / ENTRY_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"2w"`` -> seconds."""
    from dfq_deploy.errors import BadInputError

    number, unit = text.strip()[:-1], text.strip()[-1:].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _AGE_UNITS or value < 0:
        raise BadInputError(
            f"age {text!r} is not a number with a unit", hint="write it like 7d, 12h, 30m, 90s or 2w"
        ) from None
    return value * _AGE_UNITS[unit]


def verify_all(root: str | os.PathLike | None = None) -> list[tuple[CacheEntry, str | None]]:
    """Every entry under the root with what is wrong with it (``None`` when it verifies)."""
    return [(entry, verify_entry(entry.path)) for store in stores(root) for entry in store.entries()]


def clear(root: str | os.PathLike | None = None, *, older_than_s: float | None = None) -> tuple[int, int]:
    """Remove every entry (or those older than ``older_than_s``) and all leftovers; (entries, bytes) freed.

    An entry being written is skipped: its lock is held, so it is not finished yet.
    """
    removed = freed = 0
    for store in stores(root):
        for entry in store.entries():
            if older_than_s is None or entry.age_s > older_than_s:
                freed += remove(entry.path)
                removed += 1
        if older_than_s is None:
            for leftover in store.leftovers():
                if not _being_written(leftover):
                    freed += remove(leftover)
    return removed, freed


def _being_written(leftover: Path) -> bool:
    name = leftover.name
    if not name.endswith(TEMP_SUFFIX):
        return False
    key32 = name[1:].split(".", 1)[0]  # temp folders are named .<key32>.<random>.tmp
    lock = leftover.parent / f"{key32}{LOCK_SUFFIX}"
    if not lock.exists():
        return False
    import fcntl

    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False
