"""Run and time a serialized TensorRT / TensorRT-RTX engine on a CUDA GPU.

:class:`TensorRTRunner` is a :class:`~dfq_deploy.runtimes.base.Runner` (context manager,
``input_specs()``, ``infer(feeds) -> dict``, feeds checked by the base class) and owns its CUDA stream
and device buffers. Device memory comes from torch (CUDA tensors whose pointers are handed to the
execution context), so no CUDA Python binding is needed.
TensorRT and torch's CUDA are touched only on ``activate()``: constructing a runner, or importing this
module, works on a machine without a GPU or TensorRT.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dfq_deploy.converters.tensorrt import EngineArtifact, TensorRTTarget, import_tensorrt, make_logger, metadata_path
from dfq_deploy.errors import BadInputError, DfqError

from .base import InputSpecs, Runner

_NO_GPU_HINT = ("TensorRT engines run on NVIDIA GPUs only; build on this machine with --target tensorrt-rtx "
                "(no GPU needed) and run or profile the engine where a GPU is")


@dataclasses.dataclass(frozen=True)
class TensorRTProfile:
    """Timings in milliseconds (trtexec's vocabulary); memory in bytes.

    ``gpu_compute_ms`` times ``execute_async_v3`` alone with CUDA events; ``h2d_ms``/``d2h_ms`` time the
    copies (pinned host memory) separately; ``end_to_end_ms`` is copy-in + compute + copy-out per run.
    ``gpu_memory_used_bytes`` is device-wide (cudaMemGetInfo), so it includes the CUDA context and any
    other process on the GPU.
    """

    batch_size: int
    warmup: int
    iterations: int
    gpu_compute_ms: dict[str, float]
    h2d_ms: dict[str, float]
    d2h_ms: dict[str, float]
    end_to_end_ms: dict[str, float]
    throughput_qps: float
    throughput_images_per_s: float
    engine_bytes: int
    context_device_memory_bytes: int
    io_buffer_bytes: int
    gpu_memory_used_bytes: int
    device: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def latency_stats(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    """min/mean/median/p90/p95/p99/max of a list of latencies in milliseconds."""
    x = np.asarray(samples_ms, dtype=np.float64)
    stats = {"min": x.min(), "mean": x.mean(), "median": np.median(x), "max": x.max()}
    stats |= {f"p{q}": np.percentile(x, q) for q in (90, 95, 99)}
    return {k: round(float(v), 4) for k, v in stats.items()}


class TensorRTRunner(Runner):
    """Loads a serialized engine and runs it: ``with TensorRTRunner(path) as r: r.infer({"input": x})``.

    ``engine`` is an engine file, its bytes, or an :class:`EngineArtifact`. ``target`` picks the module
    (``tensorrt`` or ``tensorrt-rtx``); by default it is read from the metadata JSON written beside
    the engine, else ``tensorrt``. Without a CUDA GPU, ``activate()`` raises :class:`DfqError`.
    """

    def __init__(self, engine: str | os.PathLike | bytes | EngineArtifact, *, target: TensorRTTarget | None = None,
                 device: int = 0):
        super().__init__()
        self._source = engine
        self.target: TensorRTTarget = target or _target_from_metadata(engine) or "tensorrt"
        self.name = self.target
        self.device_index = device
        self.engine = None

    def activate_impl(self) -> None:
        """Deserialize the engine, create the execution context and a CUDA stream."""
        torch = _cuda_torch()
        trt = import_tensorrt(self.target, purpose="Running a TensorRT engine")
        self._torch, self._trt = torch, trt
        self.device = torch.device("cuda", self.device_index)
        torch.cuda.set_device(self.device)
        self._plan = _plan_bytes(self._source)
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self._plan)
        if self.engine is None:
            raise DfqError(f"{trt.__name__} {trt.__version__} could not load the engine:\n  " +
                           "\n  ".join(self._logger.messages[-10:]),
                           hint="engines load only with the TensorRT version (and, for TensorRT, the GPU) "
                                "they were built with; rebuild the engine")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._buffers: dict[str, tuple[Any, Any]] = {}  # name -> (pinned host tensor, device tensor)

    def deactivate_impl(self) -> None:
        """Release buffers, context and engine (in that order: the context refers to the engine)."""
        self.stream.synchronize()
        self._buffers.clear()
        self.context = None
        self.engine = None
        self._runtime = None

    def input_specs(self) -> InputSpecs:
        """Input name -> (shape, dtype); a dynamic dimension (-1 in TensorRT) is ``None``."""
        self.require_active()
        return {n: (tuple(None if d < 0 else d for d in self.engine.get_tensor_shape(n)),
                    np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(n))))
                for n in self._inputs}

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once: copy ``feeds`` in, execute, copy every output out (synchronous)."""
        self._stage(feeds)
        self._run_async()
        self.stream.synchronize()
        return {n: self._buffers[n][0].numpy().copy() for n in self._outputs}

    def memory(self) -> dict[str, float]:
        """The engine's size and the device memory its execution context needs, in MiB."""
        if not self.is_active:
            return {}
        return {"engine_mib": len(self._plan) / 2**20, "context_device_mib": _context_memory(self.engine) / 2**20}

    # ---- profiling ------------------------------------------------------------------------------------
    def profile(self, feeds: dict[str, np.ndarray], *, warmup: int = 5, iterations: int = 30) -> TensorRTProfile:
        """Time ``iterations`` runs after ``warmup`` with CUDA events, copies and compute separately."""
        if iterations < 1 or warmup < 0:
            raise BadInputError(f"profile needs iterations >= 1 and warmup >= 0, got {iterations}, {warmup}")
        self.require_active()
        self.check_feeds(feeds)
        torch = self._torch
        self._stage(feeds)
        for _ in range(warmup):
            self._run_async()
        self.stream.synchronize()
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(iterations)]
        for e in events:
            e[0].record(self.stream)
            self._copy_in()
            e[1].record(self.stream)
            self._execute()
            e[2].record(self.stream)
            self._copy_out()
            e[3].record(self.stream)
        self.stream.synchronize()
        h2d = [e[0].elapsed_time(e[1]) for e in events]
        compute = [e[1].elapsed_time(e[2]) for e in events]
        d2h = [e[2].elapsed_time(e[3]) for e in events]
        total = [e[0].elapsed_time(e[3]) for e in events]
        batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
        qps = 1000.0 / float(np.mean(compute))
        free, total_mem = torch.cuda.mem_get_info(self.device)
        return TensorRTProfile(
            batch_size=batch, warmup=warmup, iterations=iterations,
            gpu_compute_ms=latency_stats(compute), h2d_ms=latency_stats(h2d), d2h_ms=latency_stats(d2h),
            end_to_end_ms=latency_stats(total), throughput_qps=round(qps, 2),
            throughput_images_per_s=round(qps * batch, 2), engine_bytes=len(self._plan),
            context_device_memory_bytes=_context_memory(self.engine),
            io_buffer_bytes=sum(d.numel() * d.element_size() for _, d in self._buffers.values()),
            gpu_memory_used_bytes=int(total_mem - free), device=torch.cuda.get_device_name(self.device))

    # ---- internals ------------------------------------------------------------------------------------
    def _stage(self, feeds: dict[str, np.ndarray]) -> None:
        """Set input shapes, (re)allocate buffers and bind addresses for feeds already checked."""
        for name, array in feeds.items():
            self.context.set_input_shape(name, array.shape)
            host = self._buffer(name, array.shape, array.dtype)
            host.numpy()[...] = array
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            self._buffer(name, shape, np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name))))
        for name, (_, device) in self._buffers.items():
            self.context.set_tensor_address(name, device.data_ptr())

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype):
        torch = self._torch
        cached = self._buffers.get(name)
        if cached is None or tuple(cached[0].shape) != tuple(shape):
            torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
            # Pinned host memory: asynchronous, full-speed copies (what trtexec measures too).
            host = torch.empty(shape, dtype=torch_dtype, pin_memory=True)
            cached = (host, torch.empty(shape, dtype=torch_dtype, device=self.device))
            self._buffers[name] = cached
        return cached[0]

    def _run_async(self) -> None:
        self._copy_in()
        self._execute()
        self._copy_out()

    def _copy_in(self) -> None:
        with self._torch.cuda.stream(self.stream):
            for name in self._inputs:
                host, device = self._buffers[name]
                device.copy_(host, non_blocking=True)

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DfqError("TensorRT execution failed:\n  " + "\n  ".join(self._logger.messages[-10:]))

    def _copy_out(self) -> None:
        with self._torch.cuda.stream(self.stream):
            for name in self._outputs:
                host, device = self._buffers[name]
                host.copy_(device, non_blocking=True)


def _cuda_torch():
    try:
        import torch
    except ImportError as exc:  # torch is a core dependency; this only guards broken installs
        raise DfqError("running a TensorRT engine needs torch with CUDA", hint=_NO_GPU_HINT) from exc
    if not torch.cuda.is_available():
        raise DfqError("running a TensorRT engine needs a CUDA GPU, and torch.cuda finds none", hint=_NO_GPU_HINT)
    return torch


def _plan_bytes(source: str | os.PathLike | bytes | EngineArtifact) -> bytes:
    if isinstance(source, EngineArtifact):
        return source.plan
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = Path(source)
    if not path.is_file():
        raise BadInputError(f"engine file not found: {path}")
    return path.read_bytes()


def _target_from_metadata(source) -> TensorRTTarget | None:
    if isinstance(source, EngineArtifact):
        return source.metadata.get("target")
    if isinstance(source, (str, os.PathLike)) and metadata_path(source).is_file():
        return json.loads(metadata_path(source).read_text()).get("target")
    return None


def _context_memory(engine) -> int:
    # device_memory_size_v2 replaced device_memory_size in TensorRT 10 (and TensorRT-RTX has only _v2).
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)
