"""Precision map: asked vs used precision per layer on onnxruntime (optimized graph) and TensorRT (engine metadata)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from small_cnn import quantized_small_resnet

from dfq_deploy.analysis.precision_map import (
    LayerPrecision,
    PrecisionMap,
    asked_precision,
    asks_integer_arithmetic,
    float_fallback_warning,
    layers_from_graph,
    precision_map_onnxruntime,
    precision_map_tensorrt,
    render_precision_md,
)
from dfq_deploy.config import default_scheme
from dfq_deploy.converters.onnx_qdq import onnx_from_quant_model
from dfq_deploy.io.calibration_set import CalibrationSet
from dfq_deploy.quant.quantize import quantize


@pytest.fixture(scope="module")
def resnet18_int8():
    """torchvision ResNet-18 in the onnxruntime form (uint8 activations), at 32x32 to stay fast."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    calib = CalibrationSet(torch.randn(4, 3, 32, 32))
    qmodel = quantize(model, calib, scheme=default_scheme("onnxruntime"), progress=False)
    return qmodel, onnx_from_quant_model(qmodel)


def test_every_resnet18_conv_runs_as_an_integer_kernel_on_onnxruntime(resnet18_int8):
    qmodel, model = resnet18_int8
    pmap = precision_map_onnxruntime(model, layers=qmodel.layers)
    convs = [row for row in pmap.layers if row.kind == "Conv2d"]
    assert len(convs) == 20
    for row in convs:
        assert (row.asked, row.used, row.kernel, row.reason) == ("int8", "int8", "QLinearConv", None), row
    assert [row.layer for row in pmap.layers][:2] == ["conv1", "layer1.0.conv1"]
    json.dumps(pmap.as_dict())


def test_a_conv_onnxruntime_cannot_fuse_shows_as_float_with_its_reason():
    # Signed int8 with zero point 0 cannot absorb a ReLU, so Conv -> Relu -> QuantizeLinear stays
    # in the graph and onnxruntime runs those convs in float (the TensorRT form run on onnxruntime).
    small = quantized_small_resnet("tensorrt", images=8)
    pmap = precision_map_onnxruntime(small.onnx_model, layers=small.qmodel.layers)
    rows = {row.layer: row for row in pmap.layers}
    stem = rows["stem.0"]
    assert (stem.asked, stem.used) == ("int8", "float") and stem.kernel in ("Conv", "FusedConv")
    assert "Relu between the Conv and its QuantizeLinear" in stem.reason
    assert rows["block.conv2"].used == "int8"  # its output goes straight to a QuantizeLinear
    warning = float_fallback_warning(pmap)
    assert warning.startswith("warning:") and "stem.0" in warning
    md = "\n".join(render_precision_md(pmap.as_dict()))
    assert "| `stem.0` | int8 | **float** |" in md


def gemm_with_float_bias(*, bias: bool) -> onnx.ModelProto:
    """x -> Q/DQ (uint8) -> Gemm(W from ``fc.weight_quantizer/DequantizeLinear``, float bias) -> logits."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.float32(0.1), "x_scale"),
        numpy_helper.from_array(np.uint8(128), "x_zp"),
        numpy_helper.from_array(rng.integers(-127, 128, (4, 8)).astype(np.int8), "fc.weight_quantizer_quantized"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
        numpy_helper.from_array(np.zeros(4, np.float32), "fc.bias"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="act_quant.x/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="act_quant.x/DequantizeLinear"),
        helper.make_node(
            "DequantizeLinear",
            ["fc.weight_quantizer_quantized", "w_scale", "w_zp"],
            ["wd"],
            name="fc.weight_quantizer/DequantizeLinear",
            axis=0,
        ),
        helper.make_node("Gemm", ["xd", "wd"] + (["fc.bias"] if bias else []), ["logits"], name="/fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_gemm_with_float_bias_and_float_output_is_float_with_its_reason():
    fused = precision_map_onnxruntime(gemm_with_float_bias(bias=False)).layers[0]
    assert (fused.layer, fused.asked, fused.used, fused.kernel) == ("fc", "int8", "int8", "QGemm")
    unfused = precision_map_onnxruntime(gemm_with_float_bias(bias=True)).layers[0]
    assert (unfused.used, unfused.kernel) == ("float", "Gemm")
    assert "float bias and float output" in unfused.reason


def test_layers_are_read_from_the_graph_when_no_quant_model_is_given():
    small = quantized_small_resnet("onnxruntime", images=4)
    from_graph = layers_from_graph(small.onnx_model)
    assert [(layer.name, layer.weight_bits, layer.act_bits) for layer in from_graph] == [
        (layer.name, layer.weight_bits, layer.act_bits) for layer in small.qmodel.layers
    ]


def test_asked_precision_names():
    assert asked_precision(8, 8) == "int8" and asked_precision(4, 4) == "int4"
    assert asked_precision(4, 8) == "w4a8" and asked_precision(None, None) == "float"
    assert asked_precision(4, None) == "w4-only"


def test_weight_only_layers_computing_in_float_are_no_fallback():
    row = LayerPrecision("fc", "Linear", "/fc/Gemm", asked_precision(4, None), "float", "Gemm")
    assert not row.ran_in_float and not asks_integer_arithmetic(row.asked)
    assert float_fallback_warning(PrecisionMap("onnxruntime-cpu", (row,))) is None
    assert LayerPrecision("c", "Conv2d", "/c/Conv", "int8", "float", "Conv").ran_in_float


def test_tensorrt_map_reads_the_engine_inspector_layers():
    small = quantized_small_resnet("tensorrt", images=4)
    convs = {n.name: n for n in small.onnx_model.graph.node if n.op_type in ("Conv", "Gemm")}
    stem_node, *others = convs
    engine_layers = [
        {
            "name": f"act_quant.x/QuantizeLinear + {stem_node} + /Relu",
            "type": "CaskConvolution",
            "inputs": ["Int8 NC/32HW32"],
            "outputs": ["Int8 NC/32HW32"],
        }
    ]
    engine_layers += [
        {
            "name": name,
            "type": "CaskConvolution",
            "inputs": ["Row major linear FP32 format"],
            "outputs": ["Row major linear FP32 format"],
        }
        for name in others
    ]
    pmap = precision_map_tensorrt(
        small.onnx_model, {"target": "tensorrt", "engine_layers": engine_layers}, layers=small.qmodel.layers
    )
    rows = {row.layer: row for row in pmap.layers}
    assert pmap.runtime == "tensorrt"
    assert (rows["stem.0"].used, rows["stem.0"].reason) == ("int8", None)
    assert rows["head"].used == "float" and rows["head"].reason.startswith("unfused Q/DQ")
    no_gpu = precision_map_tensorrt(small.onnx_model, {"target": "tensorrt-rtx", "engine_layers": None})
    assert {row.used for row in no_gpu.layers} == {"unknown"} and float_fallback_warning(no_gpu) is None
