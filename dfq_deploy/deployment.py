"""The deploy-and-measure stage of ``build``, one function per target family.

Each returns a JSON-ready dict with the same keys: ``latency`` (per runner and batch size),
``fidelity_vs_fake_quant``, ``int8_vs_fp32``, ``kernels`` and ``memory``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dfq_deploy.config import ProfileConfig
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.io.interrupts import stage
from dfq_deploy.models.loading import LoadedModel
from dfq_deploy.quant.quantize import QuantModel
from dfq_deploy.runtimes.base import Runner
from dfq_deploy.runtimes.onnxruntime import OnnxRuntimeRunner, integer_kernels_are_exact, op_counts, optimized_graph
from dfq_deploy.runtimes.openvino import OPENVINO_INTEGER_PRECISIONS, RuntimeLayer
from dfq_deploy.runtimes.profiler import Agreement, compare, cpu_description, host_memory, profile
from dfq_deploy.runtimes.torch import TorchRunner

AGREEMENT_BATCH = 32
INTEGER_CONV_OPS = ("QLinearConv", "ConvInteger")
FLOAT_CONV_OPS = ("Conv", "FusedConv", "NchwcConv")


def profile_batch(calib: CalibrationSet, batch_size: int) -> np.ndarray:
    """A batch of calibration images (repeated if the set is smaller) for timing."""
    images = calib.images.numpy()
    reps = -(-batch_size // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:batch_size], dtype=np.float32)


def conv_kernels(op_counts: dict[str, int]) -> dict[str, int]:
    """How many convolutions onnxruntime runs on integers and how many in float."""
    return {
        "integer": sum(op_counts.get(op, 0) for op in INTEGER_CONV_OPS),
        "float": sum(op_counts.get(op, 0) for op in FLOAT_CONV_OPS),
    }


def onnxruntime_agreement(
    qmodel: QuantModel,
    onnx_model: onnx.ModelProto | str | Path,
    images,
    *,
    batch_size: int = AGREEMENT_BATCH,
    threads: int | None = None,
) -> Agreement:
    """How closely onnxruntime (CPU) running ``onnx_model`` reproduces the fake-quant ``qmodel`` on ``images``."""
    source = onnx_model.SerializeToString() if isinstance(onnx_model, onnx.ModelProto) else onnx_model
    with (
        OnnxRuntimeRunner(source, threads=threads, integer_kernels=integer_kernels_are_exact(onnx_model)) as runtime,
        TorchRunner(qmodel.module, input_shape=qmodel.input_shape, name="torch-fake-quant") as reference,
    ):
        return compare(reference, runtime, (b.numpy() for b in images.split(batch_size)))


def deploy_onnxruntime(
    model: LoadedModel,
    qmodel: QuantModel,
    calib: CalibrationSet,
    *,
    fp32_path: Path,
    qdq_path: Path,
    profile_config: ProfileConfig,
    device: str = "cpu",
    optimized: onnx.ModelProto | None = None,
) -> dict[str, Any]:
    """Open FP32 and INT8 sessions, check the INT8 one against the references, and time both.

    ``optimized`` is onnxruntime's optimized graph of ``qdq_path`` on ``device`` when the caller has
    it already (its kernels are counted); else it is computed here.
    """
    threads = profile_config.threads
    fp32 = OnnxRuntimeRunner(fp32_path, device=device, threads=threads)
    fp32.name = f"onnxruntime-{device}-fp32"
    int8 = OnnxRuntimeRunner(qdq_path, device=device, threads=threads)
    int8.name = f"onnxruntime-{device}-int8"
    before = host_memory()
    with fp32, int8:
        measured = measure_int8_against_fp32(
            model, qmodel, calib, fp32=fp32, int8=int8, profile_config=profile_config, memory_before=before
        )
        providers = int8.providers()
    ops = op_counts(optimized if optimized is not None else optimized_graph(qdq_path, device=device, threads=threads))
    return {
        "runtime": "onnxruntime",
        "device": device,
        "providers": providers,
        "machine": cpu_description(),
        **measured,
        "kernels": {"conv": conv_kernels(ops), "optimized_ops": dict(sorted(ops.items()))},
    }


def measure_int8_against_fp32(
    model: LoadedModel,
    qmodel: QuantModel,
    calib: CalibrationSet,
    *,
    fp32: Runner,
    int8: Runner,
    profile_config: ProfileConfig,
    memory_before: dict[str, float],
) -> dict[str, Any]:
    """Fidelity of active runner ``int8`` to the fake-quant reference and to ``fp32``, and both runners'
    latency at each batch size: the deployment keys every CPU target shares."""
    fake_quant = TorchRunner(qmodel.module, input_shape=model.input_shape, name="torch-fake-quant")
    memory: dict[str, Any] = {"before_sessions": memory_before, "after_sessions": host_memory()}
    with stage("fidelity"), fake_quant:
        batches = list(calib.batches(AGREEMENT_BATCH))
        fidelity = compare(fake_quant, int8, (b.numpy() for b in batches))
        vs_fp32 = compare(fp32, int8, (b.numpy() for b in batches))
    latency = []
    with stage("profile"):
        for batch_size in profile_config.batch_sizes:
            batch = profile_batch(calib, batch_size)
            for runner in (fp32, int8):
                latency.append(profile(runner, batch, config=profile_config).as_dict())
    memory["after_profile"] = host_memory()
    return {
        "latency": latency,
        "speedup": _speedups(latency, "int8", "fp32"),
        "fidelity_vs_fake_quant": fidelity.as_dict(),
        "int8_vs_fp32": vs_fp32.as_dict(),
        "memory": memory,
    }


def deploy_openvino(
    model: LoadedModel,
    qmodel: QuantModel,
    calib: CalibrationSet,
    *,
    fp32_path: Path,
    qdq_path: Path,
    profile_config: ProfileConfig,
) -> tuple[dict[str, Any], list[RuntimeLayer]]:
    """Compile the FP32 and Q/DQ files with OpenVINO (CPU), check the INT8 model and time both.

    With the THROUGHPUT hint each model is also served batch-1 requests kept in flight on parallel infer requests.
    Returns the deployment and the INT8 model's runtime graph (what the precision map reads).
    """
    from dfq_deploy.runtimes.openvino import OpenVINORunner

    options = {
        "threads": profile_config.threads,
        "streams": profile_config.streams,
        "performance_hint": profile_config.performance_hint,
    }
    fp32 = OpenVINORunner(fp32_path, name="openvino-cpu-fp32", **options)
    int8 = OpenVINORunner(qdq_path, name="openvino-cpu-int8", **options)
    before = host_memory()
    with fp32, int8:
        measured = measure_int8_against_fp32(
            model, qmodel, calib, fp32=fp32, int8=int8, profile_config=profile_config, memory_before=before
        )
        if profile_config.performance_hint == "THROUGHPUT":
            feeds = {int8.input_name: profile_batch(calib, 1)}
            measured["latency"] += [
                runner.throughput(feeds, iterations=profile_config.iterations).as_dict() for runner in (fp32, int8)
            ]
        layers = int8.runtime_layers()
        properties = int8.properties()
    return {
        "runtime": "openvino",
        "device": "CPU",
        "openvino": {"version": _openvino_version(), **properties},
        "machine": cpu_description(),
        **measured,
        "kernels": {"conv": openvino_conv_kernels(layers)},
    }, layers


def openvino_conv_kernels(layers: list[RuntimeLayer]) -> dict[str, int]:
    """How many convolutions OpenVINO's runtime graph runs on integers and how many in float."""
    convs = [layer for layer in layers if layer.layer_type == "Convolution"]
    integer = sum(layer.runtime_precision in OPENVINO_INTEGER_PRECISIONS for layer in convs)
    return {"integer": integer, "float": len(convs) - integer}


def _openvino_version() -> str:
    from dfq_deploy.runtimes.openvino import import_openvino

    return import_openvino().__version__


def engine_build_config(*, target: str, precision: str, profile_config: ProfileConfig, cache=None):
    """How ``build`` builds an engine: a profile per timed batch size and one for the fidelity check's
    batches (up to :data:`AGREEMENT_BATCH`); ``tensorrt`` shares the timing cache of ``cache``."""
    from dfq_deploy.converters.tensorrt import MODULES, TensorRTBuildConfig

    return TensorRTBuildConfig(
        target=target,
        precision=precision,
        batch_sizes=profile_config.batch_sizes,
        check_batch=AGREEMENT_BATCH,
        timing_cache=cache.timing_cache(MODULES[target]) if cache and target == "tensorrt" else None,
    )


def deploy_tensorrt(
    model: LoadedModel,
    qmodel: QuantModel,
    calib: CalibrationSet,
    *,
    qdq_model: onnx.ModelProto,
    fp32_path: Path,
    out_dir: Path,
    target: str,
    precision: str,
    profile_config: ProfileConfig,
    engine_cache: Path | None = None,
) -> dict[str, Any]:
    """Lint and build the engine (reused from ``engine_cache`` when an identical build is there); on a
    GPU also run it, check it against its reference and time it. Without a CUDA device the report says
    ``not_run``; any other failure of the engine raises :class:`EngineRuntimeError`."""
    from dfq_deploy.converters import trt_rules
    from dfq_deploy.converters.engine_cache import EngineCache
    from dfq_deploy.converters.tensorrt import engine_from_onnx, save_engine
    from dfq_deploy.io.layout import ENGINE

    cache = EngineCache(engine_cache) if engine_cache is not None else None
    config = engine_build_config(target=target, precision=precision, profile_config=profile_config, cache=cache)
    source = onnx.load(str(fp32_path)) if precision == "fp16" else qdq_model
    artifact = engine_from_onnx(source, config=config, cache=cache)
    engine_path = save_engine(artifact, out_dir / ENGINE)
    # onnxruntime's CPU provider runs the very same Q/DQ file: a check of the graph that needs no GPU.
    cpu_check = onnxruntime_agreement(qmodel, qdq_model, calib.images, threads=profile_config.threads)
    result: dict[str, Any] = {
        "runtime": target,
        # integer_kernels false: Q/DQ ran as float ops (onnxruntime's int8 kernels saturate on this CPU).
        "qdq_on_onnxruntime_cpu": cpu_check.as_dict() | {"integer_kernels": integer_kernels_are_exact(qdq_model)},
        "engine_path": str(engine_path),
        "engine_bytes": len(artifact.plan),
        "engine_cache": artifact.metadata.get("engine_cache", "off"),
        "engine_metadata": artifact.metadata,
        "lint": [str(v) for v in trt_rules.lint(qdq_model)],
        "machine": cpu_description(),
    }
    from dfq_deploy.runtimes.tensorrt import NoCudaDeviceError

    try:
        result.update(run_engine(engine_path, model, qmodel, calib, precision=precision, profile_config=profile_config))
    except NoCudaDeviceError as exc:
        # Building needs no GPU (TensorRT-RTX builds on CPU); running does. Say so in the report.
        result["not_run"] = exc.message
    return result


def run_engine(
    engine_path: Path,
    model: LoadedModel,
    qmodel: QuantModel,
    calib: CalibrationSet,
    *,
    precision: str,
    profile_config: ProfileConfig,
) -> dict[str, Any]:
    """Check the engine against its reference (FP32 for an fp16 engine, else the fake-quant model), time
    it at every batch size and, with ``layer_profile``, time its layers. Every feed is checked against the
    engine's optimization profiles before the GPU is touched."""
    from dfq_deploy.runtimes.tensorrt import TensorRTRunner

    runner = TensorRTRunner(engine_path)
    runner.name = f"{runner.target}-{precision}"
    check_batches = [b.numpy() for b in calib.batches(AGREEMENT_BATCH)]
    timed = {bs: profile_batch(calib, bs) for bs in profile_config.batch_sizes}
    for batch in (*check_batches, *timed.values()):  # BadInputError naming the allowed shapes, before CUDA
        runner.check_feeds({runner.input_name: batch})
    reference, key = (
        (TorchRunner(model.module, input_shape=model.input_shape, name="torch-fp32"), "fidelity_vs_fp32")
        if precision == "fp16"
        else (
            TorchRunner(qmodel.module, input_shape=model.input_shape, name="torch-fake-quant"),
            "fidelity_vs_fake_quant",
        )
    )
    with runner, reference:
        with stage("fidelity"):
            fidelity = compare(reference, runner, check_batches)
        with stage("profile"):
            latency = [
                runner.profile({runner.input_name: batch}, config=profile_config).as_dict() for batch in timed.values()
            ]
        memory = runner.memory()
    result: dict[str, Any] = {key: fidelity.as_dict(), "latency": latency, "memory": memory}
    if profile_config.layer_profile:
        largest = max(timed)
        # A runner of its own: the attached IProfiler would slow every later run of its context.
        with TensorRTRunner(engine_path, name=runner.name) as layers:
            result["layer_times"] = {
                "batch_size": largest,
                "layers": layers.layer_times({layers.input_name: timed[largest]}),
            }
    return result


def _speedups(latency: list[dict[str, Any]], fast: str, slow: str) -> dict[str, float]:
    by_key = {(row["runner"].rsplit("-", 1)[-1], row["batch_size"]): row["median_ms"] for row in latency}
    return {
        f"batch_{bs}": round(by_key[(slow, bs)] / by_key[(fast, bs)], 3)
        for (kind, bs) in by_key
        if kind == fast and (slow, bs) in by_key
    }
