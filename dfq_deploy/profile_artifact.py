"""Profile an artifact that already exists: an ONNX file in onnxruntime or OpenVINO, or a TensorRT engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dfq_deploy.config import ProfileConfig
from dfq_deploy.errors import BadInputError


def _random_batch(shape: tuple, dtype: np.dtype, batch_size: int, seed: int = 0) -> np.ndarray:
    dims = [batch_size if i == 0 else d for i, d in enumerate(shape)]
    if any(not isinstance(d, int) or d < 1 for d in dims):
        raise BadInputError(f"input shape {shape} has dynamic dimensions besides the batch; cannot make inputs")
    return np.random.default_rng(seed).standard_normal(dims).astype(dtype)


def profile_artifact(
    path: str | Path, *, target: str = "onnxruntime", device: str = "cpu", config: ProfileConfig = ProfileConfig()
) -> dict[str, Any]:
    """Latency per batch size, memory and machine for an ONNX file (onnxruntime, OpenVINO) or an engine."""
    from dfq_deploy.runtimes.profiler import cpu_description, host_memory

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"no such file: {path}")
    result: dict[str, Any] = {
        "artifact": str(path),
        "bytes": path.stat().st_size,
        "target": target,
        "machine": cpu_description(),
    }
    if target == "onnxruntime":
        result |= _profile_onnxruntime(path, device, config)
    elif target == "openvino":
        result |= _profile_openvino(path, device, config)
    else:
        from dfq_deploy.runtimes.tensorrt import TensorRTRunner

        runner = TensorRTRunner(path, target=target)
        # With metadata beside the engine, feeds are checked before the GPU is touched; a bare engine's
        # inputs are known only once it is loaded.
        feeds = _engine_feeds(runner, config) if runner.metadata else None
        with runner:
            feeds = feeds or _engine_feeds(runner, config)
            result["latency"] = [runner.profile(feed, config=config).as_dict() for feed in feeds]
            result["memory"] = runner.memory()
    result["host_memory"] = host_memory()
    return result


def _profile_onnxruntime(path: Path, device: str, config: ProfileConfig) -> dict[str, Any]:
    from dfq_deploy.runtimes.onnxruntime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(path, device=device, threads=config.threads) as runner:
        return {"latency": _latency(runner, config), "providers": runner.providers()}


def _profile_openvino(path: Path, device: str, config: ProfileConfig) -> dict[str, Any]:
    """Synchronous latency per batch size; with the THROUGHPUT hint also batch-1 async throughput."""
    from dfq_deploy.runtimes.openvino import OpenVINORunner

    if device != "cpu":
        raise BadInputError(f"the OpenVINO target runs on the CPU device, not {device!r}", hint="use --device cpu")
    with OpenVINORunner(
        path, threads=config.threads, streams=config.streams, performance_hint=config.performance_hint
    ) as runner:
        latency = _latency(runner, config)
        if config.performance_hint == "THROUGHPUT":
            ((name, (shape, dtype)),) = runner.input_specs().items()
            latency.append(
                runner.throughput({name: _random_batch(shape, dtype, 1)}, iterations=config.iterations).as_dict()
            )
        return {"latency": latency, "openvino": runner.properties()}


def _latency(runner, config: ProfileConfig) -> list[dict[str, Any]]:
    from dfq_deploy.runtimes.profiler import profile

    ((shape, dtype),) = runner.input_specs().values()
    return [profile(runner, _random_batch(shape, dtype, bs), config=config).as_dict() for bs in config.batch_sizes]


def _engine_feeds(runner, config: ProfileConfig) -> list[dict[str, np.ndarray]]:
    """One random feed per batch size, each checked against the engine's optimization profiles."""
    ((name, (shape, dtype)),) = runner.input_specs().items()
    feeds = [{name: _random_batch(shape, dtype, bs)} for bs in config.batch_sizes]
    for feed in feeds:
        runner.check_feeds(feed)
    return feeds
