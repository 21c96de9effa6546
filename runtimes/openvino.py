"""OpenVINO runner: the same Q/DQ ONNX file compiled for OpenVINO's CPU device.

OpenVINO reads the Q/DQ graph directly (QuantizeLinear/DequantizeLinear become FakeQuantize) and its
low-precision transformations fuse each quantized Conv/MatMul with its quantizers into an integer
primitive. What really runs is the compiled model's *runtime graph*
(``compiled_model.get_runtime_model()``): each of its nodes carries OpenVINO's execution-graph
rt_info (``layerType``, ``runtimePrecision``, ``outputPrecisions``, ``primitiveType``,
``originalLayersNames``), which is where the precision map reads the precision each layer ran in.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Any

import numpy as np

from dfq_deploy.errors import BadInputError, EngineBuildError, EngineRuntimeError, MissingDependencyError, first_line
from dfq_deploy.runtimes.base import InputSpecs, Runner
from dfq_deploy.runtimes.profiler import LatencyRecord

PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
# runtimePrecision (OpenVINO element type names) -> the precision map's names.
PRECISION_NAMES = {
    "u8": "int8",
    "i8": "int8",
    "u4": "int4",
    "i4": "int4",
    "f32": "float",
    "f16": "fp16",
    "bf16": "bf16",
}
OPENVINO_INTEGER_PRECISIONS = frozenset(k for k, v in PRECISION_NAMES.items() if v.startswith("int"))
# Properties read back from the compiled model for the report: what the hints really chose.
REPORTED_PROPERTIES = (
    "PERFORMANCE_HINT",
    "NUM_STREAMS",
    "INFERENCE_NUM_THREADS",
    "INFERENCE_PRECISION_HINT",
    "OPTIMAL_NUMBER_OF_INFER_REQUESTS",
)


def import_openvino():
    """The ``openvino`` module, or :class:`MissingDependencyError` naming the ``openvino`` extra."""
    try:
        import openvino
    except ImportError:
        raise MissingDependencyError("openvino", extra="openvino", purpose="the OpenVINO target") from None
    return openvino


@dataclasses.dataclass(frozen=True)
class RuntimeLayer:
    """One primitive of a compiled model's runtime graph, from its execution-graph rt_info."""

    name: str
    layer_type: str  # layerType: Convolution, FullyConnected, Eltwise, Subgraph, Reorder, ...
    runtime_precision: str  # runtimePrecision: the precision the primitive computes in (u8, i8, f32, bf16)
    output_precisions: str  # outputPrecisions
    primitive: str  # primitiveType: the kernel, e.g. jit_avx2_I8, brgconv_avx512_amx_I8
    original_layers: tuple[str, ...]  # originalLayersNames: the ops of the read model fused into it


class OpenVINORunner(Runner):
    """Compiles an ONNX model (path or bytes) with OpenVINO on ``device`` and runs it synchronously.

    ``threads`` (INFERENCE_NUM_THREADS), ``streams`` (NUM_STREAMS) and ``performance_hint``
    (LATENCY or THROUGHPUT) are OpenVINO's CPU properties; ``None`` leaves a choice to the hint.
    The batch dimension stays dynamic, so one compiled model serves every batch size.
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        *,
        device: str = "CPU",
        threads: int | None = None,
        streams: int | None = None,
        performance_hint: str = "LATENCY",
        name: str | None = None,
    ):
        super().__init__()
        if performance_hint not in PERFORMANCE_HINTS:
            raise BadInputError(
                f"unknown OpenVINO performance hint {performance_hint!r}",
                hint=f"choose {' or '.join(PERFORMANCE_HINTS)}",
            )
        self.model = model
        self.device = device.upper()
        self.config = (
            {"PERFORMANCE_HINT": performance_hint}
            | ({"INFERENCE_NUM_THREADS": int(threads)} if threads else {})
            | ({"NUM_STREAMS": int(streams)} if streams else {})
        )
        self.name = name or f"openvino-{self.device.lower()}"
        self.compiled = None
        self.request = None

    def activate_impl(self) -> None:
        ov = import_openvino()
        core = ov.Core()
        if self.device not in core.available_devices:
            raise BadInputError(
                f"OpenVINO has no {self.device} device here", hint=f"available: {core.available_devices}"
            )
        try:
            # read_model takes ONNX bytes only through a file-like object; a path it reads itself.
            source = io.BytesIO(self.model) if isinstance(self.model, bytes) else os.fspath(self.model)
            model = core.read_model(source)
            self.compiled = core.compile_model(model, self.device, self.config)
        except RuntimeError as exc:  # OpenVINO raises RuntimeError with its own message for a refused graph
            raise EngineBuildError(f"OpenVINO could not compile the model: {first_line(exc)}") from exc
        self.request = self.compiled.create_infer_request()

    def deactivate_impl(self) -> None:
        self.request = None
        self.compiled = None

    def input_specs(self) -> InputSpecs:
        self.require_active()
        return {
            port.get_any_name(): (
                tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape()),
                np.dtype(port.get_element_type().to_dtype()),
            )
            for port in self.compiled.inputs
        }

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            result = self.request.infer(feeds)
        except RuntimeError as exc:
            raise EngineRuntimeError(f"OpenVINO inference failed: {first_line(exc)}") from exc
        # The request reuses its output buffers on the next run: copy them out.
        return {port.get_any_name(): np.array(value, copy=True) for port, value in result.items()}

    def properties(self) -> dict[str, Any]:
        """What the compiled model runs with (the hint's streams, threads and inference precision)."""
        self.require_active()
        return {key: _property_text(self.compiled.get_property(key)) for key in REPORTED_PROPERTIES}

    def runtime_layers(self) -> list[RuntimeLayer]:
        """The primitives OpenVINO really executes, in execution order, with their runtime precision."""
        self.require_active()
        layers = []
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = {key: str(value.astype(str)) for key, value in op.get_rt_info().items()}
            originals = tuple(n.strip() for n in info.get("originalLayersNames", "").split(",") if n.strip())
            layers.append(
                RuntimeLayer(
                    op.get_friendly_name(),
                    info.get("layerType", "?"),
                    info.get("runtimePrecision", "?"),
                    info.get("outputPrecisions", "?"),
                    info.get("primitiveType", "?"),
                    originals,
                )
            )
        return layers

    def throughput(
        self, feeds: dict[str, np.ndarray], *, warmup: int = 5, iterations: int = 100, jobs: int = 0
    ) -> LatencyRecord:
        """Throughput as a deployment serves it: ``iterations`` requests kept in flight on ``jobs``
        parallel infer requests (0: OpenVINO's optimal number for the compiled streams).

        The record's latencies are per request (submission to completion, OpenVINO's own request
        timing); ``throughput_ips`` is images completed per second of wall time, which with several
        streams exceeds batch/median.
        """
        self.require_active()
        self.check_feeds(feeds)
        count = jobs or int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        # Plain requests, not an AsyncInferQueue with a Python callback: a stream thread that has run
        # Python code keeps a thread state, and destroying the compiled model joins that thread while
        # the caller holds the GIL, which hung the test suite. Without a callback no OpenVINO thread
        # ever needs the GIL.
        requests = [self.compiled.create_infer_request() for _ in range(count)]
        _keep_in_flight(requests, feeds, max(warmup, count))
        start = time.perf_counter()
        samples = _keep_in_flight(requests, feeds, iterations)
        wall = time.perf_counter() - start
        batch = int(next(iter(feeds.values())).shape[0])
        record = LatencyRecord.from_samples(
            f"{self.name}-async",
            batch,
            samples,
            timing={
                "mode": "async",
                "infer_requests": count,
                "warmup_runs": warmup,
                "wall_s": round(wall, 4),
                "clock": "openvino request timing",
            }
            | {k.lower(): v for k, v in self.config.items()},
        )
        return dataclasses.replace(record, throughput_ips=round(iterations * batch / wall, 4))


def _keep_in_flight(requests: list, feeds: dict[str, np.ndarray], runs: int) -> list[float]:
    """Runs ``runs`` inferences round-robin over ``requests``, each restarted as soon as its previous
    run is collected, and returns every run's latency in ms (the request's start to its completion)."""
    latencies: list[float] = []
    try:
        for i in range(runs + len(requests)):
            request = requests[i % len(requests)]
            if i >= len(requests):  # this request was started len(requests) steps ago
                request.wait()  # releases the GIL
                latencies.append(float(request.latency))
            if i < runs:
                request.start_async(feeds)
    except RuntimeError as exc:
        raise EngineRuntimeError(f"OpenVINO inference failed: {first_line(exc)}") from exc
    return latencies


def _property_text(value: Any) -> str:
    """A property as text: element types as OpenVINO names them (``f32``, ``bf16``), the rest as str."""
    return value.to_string() if hasattr(value, "to_string") else str(value)
