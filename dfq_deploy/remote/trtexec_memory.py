"""Engine size, execution-context memory and peak GPU memory from trtexec's console logs.

Only line forms that trtexec (TensorRT 8.6 to 10.x) really prints are read, for example::

    [I] [TRT] [MemUsageChange] Init CUDA: CPU +2, GPU +0, now: CPU 26, GPU 1693 (MiB)
    [I] [TRT] [MemUsageChange] TensorRT-managed allocation in IExecutionContext creation: CPU +0, GPU +8, now: CPU 0, GPU 106 (MiB)
    [I] [TRT] [MemUsageStats] Peak memory usage of TRT CPU/GPU memory allocators: CPU 9 MiB, GPU 105 MiB
    [I] Created engine with size: 101.811 MiB
    [I] [TRT] Loaded engine size: 101 MiB
    [I] Created execution context with device memory size: 7.84766 MiB

The peak is the largest "now: ... GPU b (MiB)" reading of the logs. The ``Init`` lines count the
device memory in use on the whole GPU (TensorRT reads it from the driver), the "TensorRT-managed"
lines TensorRT's own allocations; both are taken at those events only, so the peak is a lower bound
on the true one (tegrastats, on a Jetson, samples it over the run).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_NOW_GPU = re.compile(r"\[MemUsageChange\].*now: CPU \d+, GPU (\d+) \(MiB\)")
_ALLOCATOR_PEAK = re.compile(r"\[MemUsageStats\] Peak memory usage of TRT CPU/GPU memory allocators: .*GPU (\d+) MiB")
_CREATED_ENGINE = re.compile(r"\[I\] Created engine with size: ([\d.]+) MiB")
_LOADED_ENGINE = re.compile(r"Loaded engine size: (\d+) MiB")
_CONTEXT = re.compile(r"\[I\] Created execution context with device memory size: ([\d.]+) MiB")


def _last(pattern: re.Pattern, lines: list[str]) -> float | None:
    values = [float(m.group(1)) for line in lines if (m := pattern.search(line))]
    return values[-1] if values else None


def console_memory(logs: Iterable[str]) -> dict[str, Any]:
    """Memory figures (MiB) of one engine's console logs (its build and its timed run), ``{}`` if none.

    ``engine_mib``: the engine's size ("Created engine with size", to the KiB; else "Loaded engine
    size", whole MiB); ``context_device_mib``: the execution context's device memory;
    ``peak_gpu_mib``: the largest "now: GPU" reading; ``trt_allocator_peak_gpu_mib``: the peak of
    TensorRT's own allocators while it built the engine.
    """
    lines = [line for text in logs for line in text.splitlines()]
    now = [int(m.group(1)) for line in lines if (m := _NOW_GPU.search(line))]
    allocator = [int(m.group(1)) for line in lines if (m := _ALLOCATOR_PEAK.search(line))]
    engine = _last(_CREATED_ENGINE, lines)
    memory = {
        "engine_mib": engine if engine is not None else _last(_LOADED_ENGINE, lines),
        "context_device_mib": _last(_CONTEXT, lines),
        "peak_gpu_mib": float(max(now)) if now else None,
        "trt_allocator_peak_gpu_mib": float(max(allocator)) if allocator else None,
    }
    memory = {k: v for k, v in memory.items() if v is not None}
    if memory:
        memory["source"] = "trtexec console log"
    return memory
