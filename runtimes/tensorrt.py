"""Run and time a serialized TensorRT / TensorRT-RTX engine on a CUDA GPU.

:class:`TensorRTRunner` is a :class:`~dfq_deploy.runtimes.base.Runner` (context manager,
``input_specs()``, ``infer(feeds) -> dict``) and owns its CUDA stream and device buffers. Device memory
comes from torch (CUDA tensors whose pointers are handed to the execution context), so no CUDA Python
binding is needed. Feeds are checked against the engine's metadata (``model.engine.json``: inputs and
optimization profiles) *before* anything touches the GPU, and the profile that fits each feed is
selected. Every TensorRT call that can fail is checked and raises :class:`EngineRuntimeError` (exit 9);
without a CUDA device :class:`NoCudaDeviceError` (a subclass) says so.
TensorRT and torch's CUDA are touched only on ``activate()``: constructing a runner, checking feeds or
importing this module works on a machine without a GPU or TensorRT.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dfq_deploy.config import ProfileConfig
from dfq_deploy.converters.tensorrt import EngineArtifact, TensorRTTarget, import_tensorrt, metadata_path
from dfq_deploy.converters.trt_logger import process_logger
from dfq_deploy.converters.trt_profiles import ShapeProfile, select_profile
from dfq_deploy.errors import BadInputError, EngineRuntimeError
from dfq_deploy.runtimes.base import InputSpecs, Runner
from dfq_deploy.runtimes.profiler import LatencyRecord, StageTimes, timing_loop
from dfq_deploy.runtimes.trt_gpu import CudaGraph, LayerTimes, context_memory, nvml_memory, wait_for

_NO_GPU_HINT = (
    "TensorRT engines run on NVIDIA GPUs only; build on this machine with --target tensorrt-rtx "
    "(no GPU needed) and run or profile the engine where a GPU is"
)
_REBUILD_HINT = (
    "engines load only with the TensorRT version (and, for TensorRT, the GPU) they were built "
    "with; rebuild the engine (dfq-deploy build --no-cache)"
)
# TensorRT's DataType names as metadata writes them (str(trt.DataType.X) lower-cased, prefix dropped).
_METADATA_DTYPES = {
    "float": np.float32,
    "half": np.float16,
    "int8": np.int8,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "bool": np.bool_,
}


class NoCudaDeviceError(EngineRuntimeError):
    """An engine was asked to run on a machine without a CUDA device (a build reports it as not run)."""


class TensorRTRunner(Runner):
    """Loads a serialized engine and runs it: ``with TensorRTRunner(path) as r: r.infer({"input": x})``.

    ``engine`` is an engine file (its metadata read from the ``.json`` beside it), its bytes, or an
    :class:`EngineArtifact`. ``target`` picks the module (``tensorrt`` or ``tensorrt-rtx``); by default
    the metadata's, else ``tensorrt``. Without a CUDA GPU, ``activate()`` raises :class:`NoCudaDeviceError`.
    """

    def __init__(
        self,
        engine: str | os.PathLike | bytes | EngineArtifact,
        *,
        target: TensorRTTarget | None = None,
        device: int = 0,
        name: str | None = None,
    ):
        super().__init__()
        self._source = engine
        self.metadata: dict[str, Any] = _metadata_of(engine)
        self.target: TensorRTTarget = target or self.metadata.get("target") or "tensorrt"
        self.name = name or self.target
        self.device_index = device
        self.profiles = [ShapeProfile.from_dict(p) for p in self.metadata.get("profiles", [])]
        self._specs: InputSpecs | None = _specs_from_metadata(self.metadata)
        self.engine = self.context = None
        self._profile_index: int | None = None

    # ---- lifecycle --------------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        """Deserialize the engine, create the execution context and a CUDA stream (each call checked)."""
        torch = _cuda_torch()
        trt = import_tensorrt(self.target, purpose="Running a TensorRT engine")
        self._torch, self._trt = torch, trt
        self.device = torch.device("cuda", self.device_index)
        torch.cuda.set_device(self.device)
        self._plan = _plan_bytes(self._source)
        self._logger = process_logger(trt.__name__)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self._plan)
        self._require(
            self.engine is not None, f"{trt.__name__} {trt.__version__} could not load the engine", hint=_REBUILD_HINT
        )
        self.context = self.engine.create_execution_context()
        self._require(self.context is not None, "could not create an execution context (out of device memory?)")
        self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        if self._specs is None:  # bare engine bytes: read what the metadata would have said from the engine
            self._specs, self.profiles = self._specs_from_engine()
        self._buffers: dict[str, tuple[Any, Any]] = {}  # name -> (pinned host tensor, device tensor)
        self._profile_index = None

    def deactivate_impl(self) -> None:
        """Release buffers, context and engine (in that order: the context refers to the engine)."""
        self.stream.synchronize()
        self._buffers.clear()
        self.context = self.engine = self._runtime = None

    def input_specs(self) -> InputSpecs:
        """Input name -> (shape, dtype), a dynamic dimension ``None``; from the metadata, so no GPU needed."""
        if self._specs is None:
            self.require_active()
        return dict(self._specs)

    # ---- running ----------------------------------------------------------------------------------------
    def check_feeds(self, feeds: dict[str, np.ndarray]) -> int | None:
        """Names, dtypes and ranks (base class), then the optimization profile that accepts the shapes
        (:class:`BadInputError` naming the allowed shapes when none does); returns its index."""
        super().check_feeds(feeds)
        return select_profile(self.profiles, {n: a.shape for n, a in feeds.items()}, who=self.name)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; feeds are checked against the metadata before the GPU is touched."""
        self._stage(feeds, self.check_feeds(feeds))
        self._copy_in()
        self._execute()
        self._copy_out()
        self.stream.synchronize()
        return {n: self._buffers[n][0].numpy().copy() for n in self._outputs}

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.infer(feeds)

    def memory(self) -> dict[str, float]:
        """Engine size, the context's device memory and (with nvidia-ml-py) NVML's reading, in MiB."""
        if not self.is_active:
            return {}
        return {
            "engine_mib": len(self._plan) / 2**20,
            "context_device_mib": context_memory(self.engine) / 2**20,
        } | nvml_memory(self.device_index)

    # ---- profiling --------------------------------------------------------------------------------------
    def profile(
        self,
        feeds: dict[str, np.ndarray],
        *,
        config: ProfileConfig = ProfileConfig(),
        clock: Callable[[], float] = time.perf_counter,
    ) -> LatencyRecord:
        """trtexec-style timing (see :func:`timing_loop`) with CUDA events: each run's latency is H2D +
        compute + D2H on the GPU; enqueue is the host time of ``execute_async_v3`` (or the graph launch)."""
        batch = int(next(iter(feeds.values())).shape[0])
        self._stage(feeds, self.check_feeds(feeds))
        launch = self._execute
        graph = None
        if config.cuda_graph:
            graph = CudaGraph(self._torch, self.stream, self._execute, self.context)
            launch = graph.launch
        event = self._torch.cuda.Event
        marks = [event(enable_timing=True) for _ in range(4)]

        def run_once() -> tuple[float, float, float, float, float]:
            marks[0].record(self.stream)
            self._copy_in()
            marks[1].record(self.stream)
            t0 = time.perf_counter()
            launch()
            enqueue = (time.perf_counter() - t0) * 1000.0
            marks[2].record(self.stream)
            self._copy_out()
            marks[3].record(self.stream)
            wait_for(marks[3], self.stream, spin=config.spin_wait)
            return (
                marks[0].elapsed_time(marks[3]),
                marks[0].elapsed_time(marks[1]),
                marks[1].elapsed_time(marks[2]),
                marks[2].elapsed_time(marks[3]),
                enqueue,
            )

        runs = [r for _, r in timing_loop(run_once, config=config, clock=clock)]
        stage = {
            name: StageTimes.from_samples([r[i] for r in runs])
            for i, name in ((1, "h2d"), (2, "compute"), (3, "d2h"), (4, "enqueue"))
        }
        return LatencyRecord.from_samples(
            self.name,
            batch,
            [r[0] for r in runs],
            timing=config.timing_options()
            | {
                "clock": "cuda_event",
                "cuda_graph": graph is not None,
                "sync": "spin-wait on the run's last event"
                if config.spin_wait
                else "stream synchronize after each run",
            },
            **stage,
        )

    def layer_times(self, feeds: dict[str, np.ndarray], *, runs: int = 10) -> list[dict[str, Any]]:
        """Median time per engine layer over ``runs`` runs (TensorRT's IProfiler), slowest first.

        The profiler stays attached to this runner's context and slows every later run: profile layers
        with a runner of their own, after the timed runs (as the build does)."""
        self._stage(feeds, self.check_feeds(feeds))
        times = self._layer_profiler = LayerTimes(self._trt)  # kept alive as long as the context uses it
        self.context.profiler = times
        self._copy_in()
        for _ in range(runs):
            self._execute()
            self.stream.synchronize()
        return times.table()

    # ---- internals --------------------------------------------------------------------------------------
    def _stage(self, feeds: dict[str, np.ndarray], profile_index: int | None) -> None:
        """Select the profile, set shapes, (re)allocate buffers and bind addresses for checked feeds."""
        self.require_active()
        for name, array in feeds.items():
            host = self._buffer(name, array.shape, array.dtype)
            host.numpy()[...] = array
        self._prepare(feeds, profile_index)

    def _prepare(self, feeds: dict[str, np.ndarray], profile_index: int | None) -> None:
        context = self.context
        if profile_index is not None and profile_index != self._profile_index:
            ok = context.set_optimization_profile_async(profile_index, self.stream.cuda_stream)
            self._require(ok, f"set_optimization_profile_async({profile_index}) failed")
            self._profile_index = profile_index
        for name, array in feeds.items():
            self._require(
                context.set_input_shape(name, tuple(array.shape)),
                f"set_input_shape({name!r}, {tuple(array.shape)}) failed",
            )
        for name in self._outputs:
            shape = tuple(context.get_tensor_shape(name))
            self._require(all(d >= 0 for d in shape), f"output {name!r} has unresolved shape {shape}")
            self._buffer(name, shape, np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name))))
        for name, (_, device) in self._buffers.items():
            self._require(context.set_tensor_address(name, device.data_ptr()), f"set_tensor_address({name!r}) failed")

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

    def _copy_in(self) -> None:
        with self._torch.cuda.stream(self.stream):
            for name in self._inputs:
                host, device = self._buffers[name]
                device.copy_(host, non_blocking=True)

    def _execute(self) -> None:
        self._require(self.context.execute_async_v3(self.stream.cuda_stream), "execute_async_v3 failed")

    def _copy_out(self) -> None:
        with self._torch.cuda.stream(self.stream):
            for name in self._outputs:
                host, device = self._buffers[name]
                host.copy_(device, non_blocking=True)

    def _require(self, ok: bool, what: str, *, hint: str | None = None) -> None:
        if not ok:
            messages = "".join(f"\n  {m}" for m in list(self._logger.recent)[-10:])
            raise EngineRuntimeError(f"{self.name}: {what}{messages}", hint=hint)

    def _specs_from_engine(self) -> tuple[InputSpecs, list[ShapeProfile]]:
        engine, trt = self.engine, self._trt
        specs = {
            n: (
                tuple(None if d < 0 else d for d in engine.get_tensor_shape(n)),
                np.dtype(trt.nptype(engine.get_tensor_dtype(n))),
            )
            for n in self._inputs
        }
        profiles = [
            ShapeProfile(i, n, *(tuple(s) for s in engine.get_tensor_profile_shape(n, i)))
            for i in range(engine.num_optimization_profiles)
            for n in self._inputs
            if any(d is None for d in specs[n][0])
        ]
        return specs, profiles


def _cuda_torch():
    import torch  # a core dependency

    if not torch.cuda.is_available():
        raise NoCudaDeviceError(
            "running a TensorRT engine needs a CUDA GPU, and torch.cuda finds none", hint=_NO_GPU_HINT
        )
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


def _metadata_of(source) -> dict[str, Any]:
    if isinstance(source, EngineArtifact):
        return dict(source.metadata)
    if isinstance(source, (str, os.PathLike)) and metadata_path(source).is_file():
        try:
            return json.loads(metadata_path(source).read_text())
        except ValueError as exc:
            raise BadInputError(f"engine metadata {metadata_path(source)} is not valid JSON: {exc}") from None
    return {}


def _specs_from_metadata(metadata: dict[str, Any]) -> InputSpecs | None:
    if not metadata.get("inputs"):
        return None
    return {
        i["name"]: (
            tuple(None if d < 0 else d for d in i["shape"]),
            np.dtype(_METADATA_DTYPES.get(i["dtype"], np.float32)),
        )
        for i in metadata["inputs"]
    }
