"""The C allocator's policy for this process: loops that free and reallocate large tensors on every
step (pixel synthesis, block reconstruction) keep freed memory instead of faulting it in again."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc hands freed memory above its trim threshold back to the OS and serves large blocks with fresh
# mmaps, so a pixel loop, which frees and reallocates every activation on every step, faults all of
# their pages in again on every step. MobileNetV2 at 224 px (zeroq, batch 16, 6 steps, 2 threads, two
# pairs of runs on a loaded 2-core AVX2 EPYC): system time 5.7-6.8 s -> 2.0-2.4 s, minor page faults
# 1.6-2.0 M -> 0.53-0.57 M, user + system time 29.5-30.2 s -> 23.6-26.6 s, for a peak RSS 5-11%
# higher. (EfficientNet-Lite1's 22-minute build spent 18% of its CPU time in the kernel this way.)
KEEP_FREED_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep up to :data:`KEEP_FREED_BYTES` of freed memory for reuse instead of returning
    it to the OS (trim and mmap thresholds raised), for the rest of the process. Returns whether it
    applied: False where the C library is not glibc (macOS, musl), which keep their own policies."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
        gnu = getattr(libc, "gnu_get_libc_version", None)
    except OSError:
        return False
    if mallopt is None or gnu is None:
        return False
    # glibc caps the mmap threshold (32 MiB on 64-bit in older releases); larger blocks still mmap.
    mapped = mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)) and bool(mapped)
