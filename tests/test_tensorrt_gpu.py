"""Engines run on a GPU: outputs against onnxruntime on the same Q/DQ graph, profile selection, timing
(CUDA events, CUDA graphs), the per-layer profile and engine top-1 in a build.

Skipped without CUDA. The engine is built with whichever TensorRT module is installed (tensorrt first).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_trt_rules import residual_block

from dfq_deploy.config import ProfileConfig
from dfq_deploy.converters.tensorrt import TensorRTBuildConfig, engine_from_onnx, save_engine
from dfq_deploy.errors import BadInputError
from dfq_deploy.runtimes.profiler import LatencyRecord
from dfq_deploy.runtimes.tensorrt import TensorRTRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
QUICK = ProfileConfig(batch_sizes=(1, 8), warmup_ms=20, iterations=20, duration_s=0.2)


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
    artifact = engine_from_onnx(
        _dynamic_block(), config=TensorRTBuildConfig(target=target, batch_sizes=(1, 8), check_batch=32)
    )
    return save_engine(artifact, tmp_path_factory.mktemp("engine") / "block.engine")


def _x(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).uniform(-3, 3, (batch, 8, 16, 16)).astype(np.float32)


def test_matches_onnxruntime_under_every_profile(engine_path, target):
    session = ort.InferenceSession(_dynamic_block().SerializeToString(), providers=["CPUExecutionProvider"])
    with TensorRTRunner(engine_path) as runner:  # target read from the metadata beside the engine
        assert runner.input_specs() == {"x": ((None, 8, 16, 16), np.dtype(np.float32))}
        assert runner.name == target and runner.memory()["context_device_mib"] >= 0
        for batch, profile in ((1, 0), (8, 1), (5, 2), (32, 2), (1, 0)):
            x = _x(batch)
            y = runner.infer({"x": x})["y"]
            assert runner.context.active_optimization_profile == profile
            reference = session.run(None, {"x": x})[0]
            assert y.shape == reference.shape
            # int8 rounding may differ by one step (scale 0.05) where a value sits on a rounding boundary
            assert np.mean(np.abs(y - reference) <= 0.051) > 0.99


def test_bad_feeds_are_rejected(engine_path):
    with TensorRTRunner(engine_path) as runner:
        with pytest.raises(BadInputError, match="do not match the model inputs"):
            runner.infer({"image": np.zeros((1, 8, 16, 16), np.float32)})
        with pytest.raises(BadInputError, match="float32"):
            runner.infer({"x": np.zeros((1, 8, 16, 16), np.float64)})
        with pytest.raises(BadInputError, match="no optimization profile"):
            runner.infer({"x": np.zeros((33, 8, 16, 16), np.float32)})
        assert runner.infer({"x": _x(2)})["y"].shape == (2, 8, 16, 16)  # still usable afterwards


@pytest.mark.parametrize("cuda_graph, spin_wait", [(False, False), (True, False), (False, True)])
def test_profile_fills_the_latency_record_with_stage_times(engine_path, cuda_graph, spin_wait):
    config = ProfileConfig(warmup_ms=20, iterations=20, duration_s=0.2, cuda_graph=cuda_graph, spin_wait=spin_wait)
    with TensorRTRunner(engine_path) as runner:
        record = runner.profile({"x": _x(8)}, config=config)
        after = runner.infer({"x": _x(8)})["y"]  # the runner works normally after a graph replay
    assert isinstance(record, LatencyRecord) and record.batch_size == 8 and record.runs >= 20
    assert 0 < record.min_ms <= record.median_ms <= record.p90_ms <= record.p95_ms <= record.p99_ms <= record.max_ms
    for stage in (record.h2d, record.compute, record.d2h, record.enqueue):
        assert stage is not None and 0 < stage.median_ms <= stage.p99_ms
    assert record.compute.median_ms <= record.median_ms
    assert record.timing["clock"] == "cuda_event" and record.timing["cuda_graph"] is cuda_graph
    assert record.timing["sync"].startswith("spin-wait" if spin_wait else "stream synchronize")
    assert after.shape == (8, 8, 16, 16)


def test_layer_times_cover_the_convolutions(engine_path):
    with TensorRTRunner(engine_path) as runner:
        table = runner.layer_times({"x": _x(8)}, runs=5)
    assert table and all(row["median_ms"] >= 0 and row["runs"] >= 5 for row in table)
    assert sum(row["share"] for row in table) == pytest.approx(1.0, abs=1e-3)
    assert [row["median_ms"] for row in table] == sorted((row["median_ms"] for row in table), reverse=True)


def test_metadata_has_gpu_and_engine_layers(target):
    meta = engine_from_onnx(residual_block(), config=TensorRTBuildConfig(target=target)).metadata
    assert isinstance(meta["gpu"], dict) and meta["gpu"]["compute_capability"]
    assert meta["engine_layers"], "the engine inspector should list layers on a GPU"


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_build_measures_the_engine_itself(target, tmp_path, precision):
    """With --eval-set on a GPU, top-1 is the engine's; an fp16 engine is held to the FP32 model."""
    from tiny_models import tiny_resnet

    from dfq_deploy import api
    from dfq_deploy.build_config import BuildConfig, ModelOptions, OutputOptions, QuantOptions, TargetOptions
    from dfq_deploy.config import SynthesisConfig

    model = tmp_path / "tiny.pt"
    torch.save(tiny_resnet(), model)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8), y=rng.integers(0, 10, 40))
    config = BuildConfig(
        model=ModelOptions(trust_pickle=True, input_shape=(3, 16, 16)),
        synthesis=SynthesisConfig(method="noise", num_images=40),
        quant=QuantOptions(precision=precision),
        target=TargetOptions(target),
        profile=QUICK,
        output=OutputOptions(out_dir=tmp_path / "out", eval_set=tmp_path / "eval.npz", use_cache=False, progress=False),
    )
    result = api.build(model, config)
    dep, acc = result.report["deployment"], result.report["accuracy"]
    assert "not_run" not in dep and {r["batch_size"] for r in dep["latency"]} == {1, 8}
    key = "fidelity_vs_fp32" if precision == "fp16" else "fidelity_vs_fake_quant"
    assert dep[key]["reference"] == ("torch-fp32" if precision == "fp16" else "torch-fake-quant")
    assert dep[key]["samples"] == 40 and dep[key]["top1_agreement"] > 0.9
    assert acc["drop_of"] == f"engine_{precision}" and 0 <= acc[f"engine_{precision}"] <= 100
    assert dep["layer_times"]["layers"] and dep["memory"]["engine_mib"] > 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Engine layers (TensorRT IProfiler" in markdown and f"`{target}-{precision}` vs" in markdown
    json.dumps(result.report, default=str)
