"""onnxruntime runner: CPU, CUDA or TensorRT execution providers on the same Q/DQ file."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from dfq_deploy.errors import BadInputError, EngineBuildError, MissingDependencyError
from dfq_deploy.runtimes.base import InputSpecs, Runner

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
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
