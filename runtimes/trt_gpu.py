"""GPU-side helpers of the TensorRT runner: CUDA-graph replay, waiting for a run (blocking or spinning),
the per-layer profiler, device memory.

Nothing here runs without a CUDA device; the CPU test suite imports it, the ``gpu`` tests run it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from dfq_deploy.errors import EngineRuntimeError


class CudaGraph:
    """One engine execution captured as a CUDA graph on ``stream`` and replayed (trtexec's --useCudaGraph).

    TensorRT's guidance: run the context once after its input shapes change, before capturing, so no
    lazy allocation happens inside the capture; a context that reports the stream not capturable is refused.
    """

    def __init__(self, torch, stream, execute: Callable[[], None], context):
        capturable = getattr(context, "is_stream_capturable", None)
        if capturable is not None and not capturable(stream.cuda_stream):
            raise EngineRuntimeError(
                "this engine cannot be captured in a CUDA graph on its stream", hint="profile without --cuda-graph"
            )
        self._torch, self._stream = torch, stream
        execute()
        stream.synchronize()
        self._graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self._graph, stream=stream):
                execute()
        except RuntimeError as exc:  # torch reports a failed capture (cudaStreamEndCapture) as RuntimeError
            raise EngineRuntimeError(
                f"capturing the engine in a CUDA graph failed: {exc}", hint="profile without --cuda-graph"
            ) from exc

    def launch(self) -> None:
        with self._torch.cuda.stream(self._stream):
            self._graph.replay()


def wait_for(event, stream, *, spin: bool) -> None:
    """Return once ``event``, the last thing recorded on ``stream``, has happened.

    ``spin`` polls ``event.query()`` in a loop (trtexec's ``--useSpinWait``): the host sees the end of a
    run at once, where a blocking ``stream.synchronize()`` may let the thread sleep and wake late,
    which stretches short runs and their spread; the price is one busy CPU core while it waits.
    """
    if not spin:
        stream.synchronize()
        return
    while not event.query():
        pass


def LayerTimes(trt):  # noqa: N802 - builds an instance of a class derived from the module's IProfiler
    """An ``IProfiler`` for module ``trt`` that keeps every reported layer time; ``.table()`` summarises."""

    class _LayerTimes(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.samples: dict[str, list[float]] = defaultdict(list)

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.samples[layer_name].append(float(ms))

        def table(self) -> list[dict[str, Any]]:
            return layer_table(self.samples)

    return _LayerTimes()


def layer_table(samples: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Per layer: median ms, share of the summed medians and the number of reports, slowest first."""
    medians = {name: float(np.median(ms)) for name, ms in samples.items() if ms}
    total = sum(medians.values()) or 1.0
    return [
        {"layer": name, "median_ms": round(ms, 4), "share": round(ms / total, 4), "runs": len(samples[name])}
        for name, ms in sorted(medians.items(), key=lambda kv: -kv[1])
    ]


def context_memory(engine) -> int:
    """Bytes of device memory an execution context of ``engine`` needs (the largest profile's)."""
    # device_memory_size_v2 replaced device_memory_size in TensorRT 10 (and TensorRT-RTX has only _v2).
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


def nvml_memory(cuda_index: int) -> dict[str, float]:
    """Device memory used by this process and by the whole GPU, in MiB, from NVML (nvidia-ml-py).

    Empty without nvidia-ml-py (the ``gpu`` extra). NVML numbers devices physically: under
    ``CUDA_VISIBLE_DEVICES`` the CUDA index is mapped through it."""
    try:
        import pynvml
    except ImportError:
        return {}
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip().isdigit()]
    index = int(visible[cuda_index]) if cuda_index < len(visible) else cuda_index
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        mine = sum(
            p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()
        )
        return {"nvml_process_mib": round(mine / 2**20, 1), "nvml_device_used_mib": round(info.used / 2**20, 1)}
    except pynvml.NVMLError:
        return {}
    finally:
        pynvml.nvmlShutdown()
