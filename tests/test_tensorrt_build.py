"""Engine builds on CPU: lazy imports and error paths without TensorRT, real parse + build with tensorrt_rtx."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_trt_rules import _int4_matmul, fp32_onnx, ort_quantized, residual_block  # noqa: F401 (fixture)

from dfq_deploy.converters import trt_rules
from dfq_deploy.converters.tensorrt import (
    INT4_CONV_NOTE,
    NO_GPU,
    TensorRTBuildConfig,
    engine_from_onnx,
    metadata_path,
    network_from_onnx,
    save_engine,
)
from dfq_deploy.errors import BadInputError, EngineBuildError, MissingDependencyError

RTX = TensorRTBuildConfig(target="tensorrt-rtx")


def test_modules_import_without_tensorrt():
    code = (
        "import sys; sys.modules['tensorrt'] = None; sys.modules['tensorrt_rtx'] = None\n"
        "import dfq_deploy.converters.tensorrt, dfq_deploy.runtimes.tensorrt\n"
        "assert 'tensorrt_rtx' not in [m for m, v in sys.modules.items() if v is not None]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("target, package", [("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt-rtx")])
def test_missing_tensorrt_fails_with_install_hint_when_used(monkeypatch, target, package):
    monkeypatch.setitem(sys.modules, {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}[target], None)
    with pytest.raises(MissingDependencyError) as info:
        engine_from_onnx(residual_block(), config=TensorRTBuildConfig(target=target))
    assert info.value.package == package and info.value.extra == target
    assert f'pip install "dfq-deploy[{target}]"' in str(info.value)


def test_lint_runs_before_tensorrt_is_needed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(EngineBuildError) as info:
        engine_from_onnx(residual_block(int32_bias=True), config=RTX)
    assert [v.rule for v in info.value.violations] == [trt_rules.FLOAT_BIAS]
    assert "c1_bDQ" in str(info.value)


def test_precision_must_match_the_graph(tmp_path):
    with pytest.raises(BadInputError, match="float graph"):
        engine_from_onnx(residual_block(), config=TensorRTBuildConfig(target="tensorrt-rtx", precision="fp16"))
    with pytest.raises(BadInputError, match="INT4 weights"):
        engine_from_onnx(residual_block(), config=TensorRTBuildConfig(target="tensorrt-rtx", precision="int4w"))
    with pytest.raises(BadInputError, match="not found"):
        engine_from_onnx(tmp_path / "missing.onnx", config=RTX)


@pytest.mark.parametrize(
    "changes",
    [
        {"target": "trt"},
        {"precision": "int4"},
        {"workspace_mib": 0},
        {"batch_sizes": ()},
        {"batch_sizes": (0, 4)},
        {"check_batch": 0},
    ],
)
def test_config_is_validated(changes):
    with pytest.raises(BadInputError):
        TensorRTBuildConfig(**changes)


# --- real builds with TensorRT-RTX (its parser and builder run without a GPU) ------------------------------


@pytest.fixture(scope="module")
def trt_rtx():
    return pytest.importorskip("tensorrt_rtx")


def test_build_and_save_residual_block(trt_rtx, tmp_path):
    artifact = engine_from_onnx(
        residual_block(), config=TensorRTBuildConfig(target="tensorrt-rtx", timing_cache=tmp_path / "timing.cache")
    )
    meta = artifact.metadata
    assert meta["module"] == "tensorrt_rtx" and meta["tensorrt_version"] == trt_rtx.__version__
    assert meta["precision_requested"] == "int8" and meta["strongly_typed"]
    assert meta["onnx_precision"] == {"conv1": "int8", "relu1": "float", "conv2": "int8", "add": "int8"}
    assert meta["inputs"] == [{"name": "x", "shape": [1, 8, 16, 16], "dtype": "float"}]
    assert meta["timing_cache"] is None and not (tmp_path / "timing.cache").exists()  # RTX has none
    if meta["gpu"] == NO_GPU:
        assert meta["engine_layers"] is None
    path = save_engine(artifact, tmp_path / "block.engine")
    assert path.read_bytes() == artifact.plan and len(artifact.plan) == meta["engine_bytes"] > 0
    assert json.loads(metadata_path(path).read_text())["build_seconds"] == meta["build_seconds"]


def test_parser_errors_name_the_node(trt_rtx):
    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery", domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid("com.example", 1)])
    with pytest.raises(EngineBuildError, match="mystery"):
        engine_from_onnx(model, config=TensorRTBuildConfig(target="tensorrt-rtx", precision="fp16"))


def test_rtx_is_strongly_typed_only(trt_rtx):
    with pytest.raises(BadInputError, match="strongly typed"):
        engine_from_onnx(residual_block(), config=TensorRTBuildConfig(target="tensorrt-rtx", strongly_typed=False))


def test_dynamic_batch_gets_a_profile_per_batch_size(trt_rtx):
    model = residual_block()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    meta = engine_from_onnx(
        model, config=TensorRTBuildConfig(target="tensorrt-rtx", batch_sizes=(4,), check_batch=None)
    ).metadata
    assert meta["inputs"][0]["shape"] == [-1, 8, 16, 16]
    assert meta["profiles"] == [
        {"index": 0, "input": "x", "min": [4, 8, 16, 16], "opt": [4, 8, 16, 16], "max": [4, 8, 16, 16]}
    ]
    static = engine_from_onnx(residual_block(), config=RTX).metadata
    assert static["profiles"] == [] and static["engine_cache"] == "off"


def test_int4_weight_only_matmul(trt_rtx):
    meta = engine_from_onnx(
        _int4_matmul(), config=TensorRTBuildConfig(target="tensorrt-rtx", precision="int4w")
    ).metadata
    assert meta["onnx_precision"] == {"mm": "int4-weight"} and INT4_CONV_NOTE in meta["notes"]


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_quantize_static_graphs_build(trt_rtx, fp32_onnx, tmp_path, arch):  # noqa: F811 - fixture
    model = ort_quantized(fp32_onnx(arch), tmp_path / "qdq.onnx")
    meta = engine_from_onnx(model, config=RTX).metadata
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert qdq > 50 and meta["engine_bytes"] > 0


def _assert_every_qdq_parsed(model: onnx.ModelProto) -> None:
    """Each ONNX Q/DQ node became a TensorRT QUANTIZE/DEQUANTIZE layer of the same name."""
    layers = network_from_onnx(model, config=RTX).layers()
    qdq_layers = {name for name, kind in layers if kind in ("QUANTIZE", "DEQUANTIZE")}
    qdq_nodes = {n.name for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert qdq_nodes and qdq_nodes <= qdq_layers


def test_every_qdq_node_of_the_block_is_parsed(trt_rtx):
    _assert_every_qdq_parsed(residual_block())


# Our exporter's graphs (TensorRT form). Export is slow on CPU (graph capture + calibration + ONNX
# export, ~5-15 s a model on 2 cores), so the two ImageNet models are marked slow.
@pytest.mark.parametrize("precision", ["int8", "int4w"])
@pytest.mark.parametrize(
    "arch",
    [
        "cifar:resnet20",
        pytest.param("resnet18", marks=pytest.mark.slow),
        pytest.param("mobilenet_v2", marks=pytest.mark.slow),
    ],
)
def test_our_exported_graphs_lint_parse_and_build(trt_rtx, arch, precision):
    onnx_qdq = pytest.importorskip("dfq_deploy.converters.onnx_qdq")
    import torch
    import torchvision

    from dfq_deploy.config import INT8_TENSORRT, int4_weight_only
    from dfq_deploy.io.calibration_set import CalibrationSet
    from dfq_deploy.models.cifar_resnet import cifar_resnet
    from dfq_deploy.quant.quantize import quantize

    model = cifar_resnet("resnet20") if arch.startswith("cifar:") else getattr(torchvision.models, arch)()
    calib = CalibrationSet(images=torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    scheme = dataclasses.replace(INT8_TENSORRT, calibrator="max")
    qmodel = quantize(
        model.eval(),
        calib,
        scheme=int4_weight_only(scheme) if precision == "int4w" else scheme,
        batch_size=4,
        progress=False,
    )
    graph = onnx_qdq.onnx_from_quant_model(qmodel)
    assert trt_rules.lint(graph) == []
    _assert_every_qdq_parsed(graph)
    meta = engine_from_onnx(graph, config=dataclasses.replace(RTX, precision=precision)).metadata
    convs = [p for n, p in meta["onnx_precision"].items() if "conv" in n.lower()]
    assert meta["engine_bytes"] > 0 and convs and set(convs) == {"int8"}
    gemms = {p for n, p in meta["onnx_precision"].items() if n.endswith("/Gemm")}
    if precision == "int4w":  # the classifier's weights are INT4 blocks, its input float; convs stay INT8
        assert graph.opset_import[0].version == 21 and gemms == {"int4-weight"} and INT4_CONV_NOTE in meta["notes"]
    else:
        assert gemms == {"int8"}


def test_fp16_float_graph_builds_half_size(trt_rtx, fp32_onnx):  # noqa: F811 - fixture
    path = fp32_onnx("resnet18")
    fp16 = engine_from_onnx(path, config=TensorRTBuildConfig(target="tensorrt-rtx", precision="fp16")).metadata
    weights = sum(np.prod(t.dims) for t in onnx.load(path).graph.initializer)
    # FP16 weights: about two bytes per parameter (an FP32 engine would need four)
    assert fp16["engine_bytes"] < 3 * weights


def test_runner_without_gpu_fails_clearly_when_used(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; tests/test_tensorrt_gpu.py runs the engine")
    from dfq_deploy.errors import EngineRuntimeError
    from dfq_deploy.runtimes.base import Runner
    from dfq_deploy.runtimes.tensorrt import NoCudaDeviceError, TensorRTRunner

    (tmp_path / "x.engine").write_bytes(b"not an engine")
    runner = TensorRTRunner(tmp_path / "x.engine", target="tensorrt-rtx")  # constructing needs nothing
    assert isinstance(runner, Runner) and runner.name == "tensorrt-rtx"
    with pytest.raises(NoCudaDeviceError, match="CUDA GPU") as info:
        with runner:
            pass
    assert isinstance(info.value, EngineRuntimeError) and info.value.exit_code == 9
    assert "tensorrt-rtx" in str(info.value)  # the hint says how to build without a GPU
    assert not runner.is_active and runner.memory() == {}
    with pytest.raises(RuntimeError, match="not active"):  # no metadata: nothing to check feeds against
        runner.infer({"input": np.zeros((1, 3), np.float32)})
