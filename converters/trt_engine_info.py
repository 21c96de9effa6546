"""What a built TensorRT engine is, as JSON-ready metadata: versions, build GPU, inputs and outputs,
profiles, the compute capabilities it runs on, the per-op precision its graph asks for and, where a GPU
can load it, the per-layer precision the engine inspector reports."""

from __future__ import annotations

import hashlib
import json
from types import ModuleType
from typing import TYPE_CHECKING, Any

import onnx

from dfq_deploy.converters.trt_precision import precision_summary

if TYPE_CHECKING:
    from dfq_deploy.converters.tensorrt import TensorRTBuildConfig
    from dfq_deploy.converters.trt_profiles import ShapeProfile

NO_GPU = "none (built on CPU)"


def engine_metadata(
    trt: ModuleType,
    config: TensorRTBuildConfig,
    *,
    plan: bytes,
    build_seconds: float,
    network: Any,
    builder_config: Any,
    profiles: list[ShapeProfile],
    model: onnx.ModelProto,
    logger: Any,
    timing_cache_used: bool,
    notes: list[str],
) -> dict[str, Any]:
    """The metadata saved beside an engine (``notes`` is extended in place and shared with it)."""
    metadata = {
        "target": config.target,
        "module": trt.__name__,
        "tensorrt_version": trt.__version__,
        "gpu": gpu_info(),
        "precision_requested": config.precision,
        "strongly_typed": config.strongly_typed,
        "workspace_mib": config.workspace_mib,
        "timing_cache": str(config.timing_cache) if timing_cache_used else None,
        "build_seconds": round(build_seconds, 3),
        "engine_bytes": len(plan),
        "engine_sha256": hashlib.sha256(plan).hexdigest(),
        "inputs": _io(network.get_input(i) for i in range(network.num_inputs)),
        "outputs": _io(network.get_output(i) for i in range(network.num_outputs)),
        "profiles": [p.as_dict() for p in profiles],
        "compute_capabilities": _compute_capabilities(builder_config),
        "onnx_precision": {n: p.precision for n, p in precision_summary(model).items()},
        "engine_layers": _inspect_layers(trt, plan, logger),
        "notes": notes,
    }
    if metadata["engine_layers"] is None:
        notes.append(
            "engine_layers: the engine inspector needs a GPU to load the engine; onnx_precision is "
            "the per-op precision the Q/DQ graph asks for"
        )
    return metadata


def _io(tensors) -> list[dict[str, Any]]:
    return [{"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).rsplit(".", 1)[-1].lower()} for t in tensors]


def _compute_capabilities(builder_config) -> list[str] | str:
    # TensorRT-RTX compiles ahead of time for a set of GPU generations; plain TensorRT for the build GPU.
    count = getattr(builder_config, "num_compute_capabilities", None)
    if count is None:
        return "the build GPU"
    if count == 0:
        return "default set of the TensorRT-RTX version"
    return [str(builder_config.get_compute_capability(i)).rsplit(".", 1)[-1] for i in range(count)]


def gpu_info() -> dict[str, str] | str:
    """The CUDA GPU torch sees (name, compute capability), or :data:`NO_GPU`."""
    try:
        import torch
    except ImportError:
        return NO_GPU
    if not torch.cuda.is_available():
        return NO_GPU
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def _inspect_layers(trt: ModuleType, plan: bytes, logger) -> list[dict[str, Any]] | None:
    """Per-layer types and tensor formats from the engine inspector; ``None`` without a GPU to load on."""
    if gpu_info() == NO_GPU:
        return None  # deserializing needs a CUDA device; trying only prints CUDA errors
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        return None
    from dfq_deploy.analysis.engine_layers import engine_layers_from_layer_info

    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return engine_layers_from_layer_info(info)
