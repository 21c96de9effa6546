"""onnxruntime's timed runs go through IOBinding with device-resident inputs: the same code path on the
CPU (device ``cpu``, which CI runs) as on CUDA (the ``gpu`` test, which skips without one)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfq_deploy.config import ProfileConfig
from dfq_deploy.runtimes.onnxruntime import DeviceBinding, OnnxRuntimeRunner
from dfq_deploy.runtimes.profiler import profile

QUICK = ProfileConfig(warmup_ms=0, iterations=5, duration_s=0)


def two_output_onnx() -> bytes:
    """Conv (dynamic batch) with two outputs, Relu and Sigmoid, so output order and names matter."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["relu"]),
            helper.make_node("Sigmoid", ["c"], ["sigmoid"]),
        ],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 10, 10])],
        [
            helper.make_tensor_value_info("relu", TensorProto.FLOAT, ["batch", 6, 10, 10]),
            helper.make_tensor_value_info("sigmoid", TensorProto.FLOAT, ["batch", 6, 10, 10]),
        ],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def batch(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 10, 10)).astype(np.float32)


@pytest.mark.parametrize("size", [1, 4])
def test_io_binding_outputs_equal_session_run(size):
    with OnnxRuntimeRunner(two_output_onnx(), threads=1) as runner:
        feeds = {"x": batch(size)}
        plain = dict(zip(["relu", "sigmoid"], runner.session.run(["relu", "sigmoid"], feeds), strict=True))
        binding = runner.bind(feeds)
        binding.run()
        bound = binding.outputs()
        assert list(bound) == ["relu", "sigmoid"]
        for name in plain:
            assert bound[name].shape == (size, 6, 10, 10)
            np.testing.assert_array_equal(bound[name], plain[name])
        assert (bound["relu"] > 0).any() and not np.array_equal(bound["relu"], bound["sigmoid"])


def test_kept_outputs_and_uploaded_inputs_give_the_new_result():
    """After keep_outputs() later runs write into the same device buffers; upload() changes the input."""
    with OnnxRuntimeRunner(two_output_onnx(), threads=1) as runner:
        binding = runner.bind({"x": batch(2, seed=1)})
        binding.run()
        binding.keep_outputs()
        first = binding.outputs()
        binding.upload({"x": batch(2, seed=2)})
        binding.run()
        second = binding.outputs()
        expected = runner.session.run(["relu", "sigmoid"], {"x": batch(2, seed=2)})
        np.testing.assert_array_equal(second["sigmoid"], expected[1])
        assert not np.array_equal(first["sigmoid"], second["sigmoid"])


def test_the_timing_loop_runs_through_the_binding(monkeypatch):
    calls = []
    run = DeviceBinding.run
    monkeypatch.setattr(DeviceBinding, "run", lambda self: calls.append(1) or run(self))
    with OnnxRuntimeRunner(two_output_onnx(), threads=1) as runner:

        def plain_run(*args, **kwargs):
            raise AssertionError("session.run was timed instead of run_with_iobinding")

        monkeypatch.setattr(runner.session, "run", plain_run)
        record = profile(runner, batch(3), config=QUICK)
    assert record.runs == 5 and len(calls) == 1 + 5  # one run to allocate the outputs, then the timed ones
    assert record.runner == "onnxruntime-cpu" and record.batch_size == 3
    assert record.timing["io_binding"] == "cpu" and record.h2d is None and record.d2h is None
    assert 0 < record.min_ms <= record.median_ms <= record.max_ms


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu")
def test_cuda_binding_times_copies_apart_from_compute():
    with OnnxRuntimeRunner(two_output_onnx(), device="cuda") as runner:
        feeds = {"x": batch(8)}
        binding = runner.bind(feeds)
        binding.run()
        np.testing.assert_allclose(binding.outputs()["relu"], runner.session.run(["relu"], feeds)[0], atol=1e-4)
        record = profile(runner, batch(8), config=QUICK)
    assert record.timing["io_binding"] == "cuda"
    assert record.h2d is not None and record.d2h is not None and record.compute is not None
    assert record.compute.median_ms == pytest.approx(record.median_ms, rel=1e-6)
