"""Engines run on a GPU: outputs against onnxruntime on the same Q/DQ graph, input checks, profiling.

Skipped without CUDA. The engine is built with whichever TensorRT module is installed (tensorrt first).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dfq_deploy.converters.tensorrt import TensorRTBuildConfig, engine_from_onnx, save_engine
from dfq_deploy.errors import BadInputError
from dfq_deploy.runtimes.tensorrt import TensorRTRunner
from test_trt_rules import residual_block

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def target() -> str:
    for target, module in (("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt_rtx")):
        if importlib.util.find_spec(module) is not None:
            return target
    pytest.skip("neither tensorrt nor tensorrt_rtx is installed")


def _dynamic_block():
    model = residual_block()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    return model


@pytest.fixture(scope="module")
def engine_path(target, tmp_path_factory):
    artifact = engine_from_onnx(_dynamic_block(), config=TensorRTBuildConfig(target=target, max_batch=8))
    return save_engine(artifact, tmp_path_factory.mktemp("engine") / "block.engine")


def test_matches_onnxruntime(engine_path, target):
    x = np.random.default_rng(0).uniform(-3, 3, (2, 8, 16, 16)).astype(np.float32)
    reference = ort.InferenceSession(_dynamic_block().SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with TensorRTRunner(engine_path) as runner:  # target read from the metadata beside the engine
        assert runner.input_specs() == {"x": ((None, 8, 16, 16), np.dtype(np.float32))}
        assert runner.name == target and runner.memory()["context_device_mib"] >= 0
        y = runner.infer({"x": x})["y"]
    assert y.shape == reference.shape
    # int8 rounding may differ by one step (scale 0.05) where a value sits on a rounding boundary
    assert np.mean(np.abs(y - reference) <= 0.051) > 0.99


def test_bad_feeds_are_rejected(engine_path):
    with TensorRTRunner(engine_path) as runner:
        with pytest.raises(BadInputError, match="do not match the model inputs"):
            runner.infer({"image": np.zeros((1, 8, 16, 16), np.float32)})
        with pytest.raises(BadInputError, match="float32"):
            runner.infer({"x": np.zeros((1, 8, 16, 16), np.float64)})
        with pytest.raises(BadInputError, match="shape"):
            runner.infer({"x": np.zeros((1, 8, 15, 16), np.float32)})


def test_profile(engine_path):
    x = np.zeros((4, 8, 16, 16), np.float32)
    with TensorRTRunner(engine_path) as runner:
        prof = runner.profile({"x": x}, warmup=3, iterations=20)
    stats = prof.gpu_compute_ms
    assert 0 < stats["min"] <= stats["median"] <= stats["p90"] <= stats["p95"] <= stats["p99"] <= stats["max"]
    assert prof.h2d_ms["median"] > 0 and prof.d2h_ms["median"] > 0
    assert prof.batch_size == 4 and prof.throughput_images_per_s == pytest.approx(4 * prof.throughput_qps, rel=1e-3)
    assert prof.engine_bytes == engine_path.stat().st_size and prof.gpu_memory_used_bytes > 0


def test_metadata_has_gpu_and_engine_layers(target):
    meta = engine_from_onnx(residual_block(), config=TensorRTBuildConfig(target=target)).metadata
    assert isinstance(meta["gpu"], dict) and meta["gpu"]["compute_capability"]
    assert meta["engine_layers"], "the engine inspector should list layers on a GPU"
