"""The C allocator's policy around loops that free and reallocate large tensors on every step (pixel
synthesis, block reconstruction): inside them glibc keeps freed memory instead of faulting it in again;
after them the memory goes back to the OS, so later stages do not pay for the loops' policy."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Iterator

# glibc hands freed memory above its trim threshold back to the OS and serves large blocks with fresh
# mmaps, so a pixel loop, which frees and reallocates every activation on every step, faults all of
# their pages in again on every step. MobileNetV2 at 224 px (zeroq, batch 16, 6 steps, 2 threads, two
# pairs of runs on a loaded 2-core AVX2 EPYC): system time 5.7-6.8 s -> 2.0-2.4 s, minor page faults
# 1.6-2.0 M -> 0.53-0.57 M, user + system time 29.5-30.2 s -> 23.6-26.6 s, for a peak RSS 5-11%
# higher. (EfficientNet-Lite1's 22-minute build spent 18% of its CPU time in the kernel this way.)
KEEP_FREED_BYTES = 1 << 30
# Kept for the rest of the process, the policy cost a 224-px 4-bit build 6.6 GiB of peak memory in the
# stages after the loops (Lite1, 200 reconstruction iterations: 13.4 GiB against 6.8 GiB without it).
# On leaving, the thresholds go to where glibc's own dynamic policy settles for large blocks (mmap at
# its 64-bit ceiling of 32 MiB, trim at twice that); setting them once turns that policy off for good.
AFTER_MMAP_BYTES = 32 << 20
AFTER_TRIM_BYTES = 2 * AFTER_MMAP_BYTES
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

_lock = threading.Lock()
_depth = 0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (it has mallopt and malloc_trim), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    needed = ("mallopt", "malloc_trim", "gnu_get_libc_version")
    return libc if libc is not None and all(hasattr(libc, n) for n in needed) else None


def _set_thresholds(libc: ctypes.CDLL, *, trim: int, mmap: int) -> bool:
    # glibc refuses an mmap threshold above half its heap size (32 MiB on 64-bit); larger blocks still mmap.
    mapped = libc.mallopt(_M_MMAP_THRESHOLD, mmap) or libc.mallopt(_M_MMAP_THRESHOLD, min(mmap, 32 << 20))
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, trim)) and bool(mapped)


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Inside the block glibc keeps up to :data:`KEEP_FREED_BYTES` of freed memory for reuse instead of
    returning it to the OS (trim and mmap thresholds raised). On leaving the outermost such block the
    thresholds come down to :data:`AFTER_TRIM_BYTES` / :data:`AFTER_MMAP_BYTES` and ``malloc_trim``
    returns what was kept. Yields whether the policy applies: False where the C library is not glibc
    (macOS, musl), which keep their own policies."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _lock:
        _depth += 1
        applied = _set_thresholds(libc, trim=KEEP_FREED_BYTES, mmap=KEEP_FREED_BYTES)
    try:
        yield applied
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set_thresholds(libc, trim=AFTER_TRIM_BYTES, mmap=AFTER_MMAP_BYTES)
                libc.malloc_trim(0)
