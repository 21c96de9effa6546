"""onnxruntime runner: CPU, CUDA or TensorRT execution providers on the same Q/DQ file."""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from dfq_deploy.config import ProfileConfig
from dfq_deploy.errors import BadInputError, EngineBuildError, MissingDependencyError
from dfq_deploy.runtimes.base import InputSpecs, Runner
from dfq_deploy.runtimes.profiler import LatencyRecord, StageTimes, timing_loop

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
# Where a session's inputs and outputs live (OrtValue device types): the TensorRT provider runs on CUDA memory.
ORT_DEVICE_TYPE = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "cuda"}
_TRANSFER_SAMPLES = 200  # H2D and D2H copies timed after the compute runs (GPU devices)
# onnxruntime's ClipQuantRewrite drops a Clip(0, 6) in front of a *signed* QuantizeLinear with zero
# point 0 as if the quantizer clipped negatives too, which corrupts symmetric-int8 MobileNetV2
# graphs (relative error 1.46 instead of 0.011, measured with onnxruntime 1.32). Where it is
# exact (uint8, zero point 0) our exporter has already removed the Clip itself.
DISABLED_OPTIMIZERS = ["ClipQuantRewrite"]
# From opset 21 (our INT4 graphs), QDQPropagationTransformer inserts a QuantizeLinear with an
# ``output_dtype`` attribute that onnxruntime's own type inference then rejects ("output_dtype INT8
# does not match y_zero_point type UINT8", microsoft/onnxruntime#25526), so the session fails to
# load (onnxruntime 1.32, CIFAR ResNet's strided-Slice shortcut). The pass only copies Q/DQ across
# data movement ops, which changes no value.
OPSET21_DISABLED_OPTIMIZERS = ["QDQPropagationTransformer"]

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime", extra="gpu", purpose="running ONNX models") from None
    return onnxruntime


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX model (path or bytes) with onnxruntime on ``device`` (cpu, cuda or tensorrt).

    ``integer_kernels=False`` keeps onnxruntime from fusing Q/DQ groups into integer kernels, so
    Q/DQ run as float ops: exactly the graph's arithmetic (see :func:`integer_kernels_are_exact`).
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        *,
        device: str = "cpu",
        threads: int | None = None,
        save_optimized: str | os.PathLike | None = None,
        integer_kernels: bool = True,
    ):
        super().__init__()
        if device not in PROVIDERS:
            raise BadInputError(f"unknown onnxruntime device {device!r}", hint=f"choose {', '.join(PROVIDERS)}")
        self.model = model
        self.device = device
        self.threads = threads
        self.save_optimized = save_optimized
        self.integer_kernels = integer_kernels
        self.name = f"onnxruntime-{device}"
        self.session = None

    def activate_impl(self) -> None:
        ort = _import_ort()
        available = ort.get_available_providers()
        wanted = PROVIDERS[self.device]
        if wanted[0] not in available:
            raise MissingDependencyError(
                "onnxruntime-gpu",
                extra="gpu",
                purpose=f"the {self.device} execution provider (available here: {available})",
            )
        source = self.model if isinstance(self.model, bytes) else str(self.model)
        proto = _read(source)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0) if proto else 0
        options = ort.SessionOptions()
        # Basic level: constant folding and the like, none of the Q/DQ fusions (they are "extended").
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.integer_kernels
            else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        )
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        if self.save_optimized:
            options.optimized_model_filepath = str(self.save_optimized)
        disabled = DISABLED_OPTIMIZERS + (OPSET21_DISABLED_OPTIMIZERS if opset >= 21 else [])
        try:
            self.session = ort.InferenceSession(source, options, providers=wanted, disabled_optimizers=disabled)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EngineBuildError(f"onnxruntime could not load the model: {str(exc).strip().splitlines()[0]}") from exc

    def deactivate_impl(self) -> None:
        self.session = None

    def input_specs(self) -> InputSpecs:
        return {
            i.name: (
                tuple(d if isinstance(d, int) else None for d in i.shape),
                np.dtype(_ORT_TYPES.get(i.type, np.float32)),
            )
            for i in self.session.get_inputs()
        }

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds), strict=False))

    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def bind(self, feeds: dict[str, np.ndarray]) -> DeviceBinding:
        """Checked ``feeds`` copied once to the session's device and bound with its outputs (IOBinding)."""
        self.require_active()
        self.check_feeds(feeds)
        return DeviceBinding(_import_ort(), self.session, feeds, ORT_DEVICE_TYPE[self.device])

    def profile(
        self,
        feeds: dict[str, np.ndarray],
        *,
        config: ProfileConfig = ProfileConfig(),
        clock: Callable[[], float] = time.perf_counter,
    ) -> LatencyRecord:
        """trtexec-style timing (:func:`timing_loop`) of ``run_with_iobinding`` alone: inputs resident on
        the device, outputs left there, so no host copy is timed as compute. On a GPU the H2D and D2H
        copies are timed apart afterwards (``h2d``, ``d2h``); ``compute`` is the timed runs themselves.
        The same path runs on the CPU (device ``cpu``), where there are no copies to time."""
        binding = self.bind(feeds)
        binding.run()  # allocates the outputs on the device; every later run writes into them
        binding.keep_outputs()
        samples = [ms for ms, _ in timing_loop(binding.run, config=config, clock=clock)]
        stages: dict[str, StageTimes] = {}
        if binding.device_type != "cpu":
            stages = {
                "h2d": _timed(lambda: binding.upload(feeds), clock),
                "compute": StageTimes.from_samples(samples),
                "d2h": _timed(binding.outputs, clock),
            }
        timing = config.timing_options() | {
            "clock": getattr(clock, "__name__", "clock"),
            "io_binding": binding.device_type,
            "transfers": "timed apart (h2d, d2h)" if stages else "none (host memory)",
        }
        batch = int(next(iter(feeds.values())).shape[0])
        return LatencyRecord.from_samples(self.name, batch, samples, timing=timing, **stages)


def _timed(call: Callable[[], object], clock: Callable[[], float]) -> StageTimes:
    samples = []
    for _ in range(_TRANSFER_SAMPLES):
        t0 = clock()
        call()
        samples.append((clock() - t0) * 1000.0)
    return StageTimes.from_samples(samples)


class DeviceBinding:
    """A session's IOBinding with device-resident inputs (OrtValues copied once) and outputs on the
    device; ``run()`` executes without touching host memory, ``outputs()`` copies the results home."""

    def __init__(self, ort, session, feeds: dict[str, np.ndarray], device_type: str):
        self.session, self.device_type = session, device_type
        self.io = session.io_binding()
        self.inputs = {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device_type, 0)
            for name, array in feeds.items()
        }
        for name, value in self.inputs.items():
            self.io.bind_ortvalue_input(name, value)
        self.names = [o.name for o in session.get_outputs()]
        for name in self.names:
            self.io.bind_output(name, device_type, 0)

    def run(self) -> None:
        """One inference; returns once the outputs are ready (onnxruntime synchronises its providers)."""
        self.session.run_with_iobinding(self.io)

    def keep_outputs(self) -> None:
        """Bind the outputs the last run allocated, so later runs reuse them instead of allocating anew."""
        for name, value in zip(self.names, self.io.get_outputs(), strict=True):
            self.io.bind_ortvalue_output(name, value)

    def upload(self, feeds: dict[str, np.ndarray]) -> None:
        """Copy new input values into the bound device inputs (H2D on a GPU)."""
        for name, array in feeds.items():
            self.inputs[name].update_inplace(np.ascontiguousarray(array))

    def outputs(self) -> dict[str, np.ndarray]:
        """The last run's outputs, copied to host memory (D2H on a GPU)."""
        return dict(zip(self.names, self.io.copy_outputs_to_cpu(), strict=True))


def _read(source: str | bytes) -> onnx.ModelProto | None:
    """The model's graph without external weights (``None`` when unreadable: onnxruntime says why)."""
    try:
        return (
            onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source, load_external_data=False)
        )
    except Exception:  # noqa: BLE001 - onnxruntime reports unreadable models with its own message
        return None


def integer_kernels_are_exact(model: str | os.PathLike | bytes | onnx.ModelProto) -> bool:
    """Whether onnxruntime's CPU integer kernels compute ``model``'s Q/DQ arithmetic exactly here.

    Not for signed-int8 activations (the TensorRT form) on an x86 CPU without VNNI: onnxruntime runs
    those as u8 x s8 with vpmaddubsw, whose int16 sums saturate (relative error 0.03 against the
    fake-quant model on an AVX2 EPYC, onnxruntime 1.32). Checks that stand in for TensorRT on such a
    CPU run the graph with ``integer_kernels=False`` instead.
    """
    from dfq_deploy.runtimes.cpu_features import has_int8_dot_product

    if has_int8_dot_product():
        return True
    if not isinstance(model, onnx.ModelProto):
        model = _read(model if isinstance(model, bytes) else str(model))
    return not _signed_activations(model)


def _signed_activations(model: onnx.ModelProto | None) -> bool:
    """True when some QuantizeLinear writes int8 (the TensorRT form's signed activations)."""
    if model is None:
        return False
    int8_inits = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    return any(
        n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in int8_inits for n in model.graph.node
    )


def optimized_graph(
    model: str | os.PathLike | bytes, *, device: str = "cpu", threads: int | None = None
) -> onnx.ModelProto:
    """The graph onnxruntime really executes on ``device``, after its fusions."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        with OnnxRuntimeRunner(model, device=device, threads=threads, save_optimized=path):
            pass
        return onnx.load(str(path))


def op_counts(model: onnx.ModelProto) -> Counter:
    """How many nodes of each op type ``model`` has (of an :func:`optimized_graph`: the kernels that run)."""
    return Counter(node.op_type for node in model.graph.node)


def optimized_op_counts(model: str | os.PathLike | bytes, *, threads: int | None = None) -> Counter:
    """Op types of the graph onnxruntime (CPU) really executes, after its fusions."""
    return op_counts(optimized_graph(model, threads=threads))
