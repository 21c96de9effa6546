"""The TensorRT lint on hand-built Q/DQ graphs (one fault each) and on onnxruntime's quantize_static output."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dfq_deploy.converters import trt_rules
from dfq_deploy.converters.trt_rules import Violation, format_lint, inspect_text, lint, precision_summary

C = 8  # channels of the test block


def residual_block(
    *,
    act_zero_point: int = 0,
    act_dtype=np.int8,
    per_channel_act: bool = False,
    int4_conv: bool = False,
    residual_qdq: bool = True,
    int32_bias: bool = False,
    batchnorm: bool = False,
    weight_axis: int = 0,
    opset: int = 19,
) -> onnx.ModelProto:
    """x -> Q/DQ -> conv1 -> relu1 -> Q/DQ -> conv2 -> Q/DQ -> add(+ Q/DQ'd x), TensorRT form by default.

    Each keyword injects one fault; node names are stable so tests can check the reported node.
    """
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def qdq(tag, tensor):
        scale = const(
            f"{tag}_scale", np.full(C, 0.05, np.float32) if per_channel_act and tag == "r1" else np.float32(0.05)
        )
        zp = const(
            f"{tag}_zp",
            np.full(C, act_zero_point, act_dtype)
            if per_channel_act and tag == "r1"
            else np.array(act_zero_point, act_dtype),
        )
        nodes.append(helper.make_node("QuantizeLinear", [tensor, scale, zp], [f"{tag}_q"], name=f"{tag}_Q", axis=1))
        nodes.append(
            helper.make_node("DequantizeLinear", [f"{tag}_q", scale, zp], [f"{tag}_dq"], name=f"{tag}_DQ", axis=1)
        )
        return f"{tag}_dq"

    def weight(tag, four_bit=False):
        if four_bit:  # blocked INT4 along the input channels: what TensorRT refuses for convs
            w = helper.make_tensor(f"{tag}_w", TensorProto.INT4, [C, C, 3, 3], rng.integers(-8, 8, C * C * 9).tolist())
            inits.append(w)
            scale = const(f"{tag}_ws", np.full((C, C // 4, 3, 3), 0.01, np.float32))
            nodes.append(
                helper.make_node(
                    "DequantizeLinear", [w.name, scale], [f"{tag}_wdq"], name=f"{tag}_wDQ", axis=1, block_size=4
                )
            )
            return f"{tag}_wdq"
        w = const(f"{tag}_w", rng.integers(-127, 128, (C, C, 3, 3)).astype(np.int8))
        scale = const(f"{tag}_ws", np.full(C, 0.01, np.float32))
        zp = const(f"{tag}_wz", np.zeros(C, np.int8))
        nodes.append(
            helper.make_node("DequantizeLinear", [w, scale, zp], [f"{tag}_wdq"], name=f"{tag}_wDQ", axis=weight_axis)
        )
        return f"{tag}_wdq"

    x = qdq("in", "x")
    conv1_inputs = [x, weight("c1")]
    if int32_bias:
        bias = const("c1_b", np.zeros(C, np.int32))
        bias_scale = const("c1_bs", np.full(C, 5e-4, np.float32))
        nodes.append(helper.make_node("DequantizeLinear", [bias, bias_scale], ["c1_bdq"], name="c1_bDQ", axis=0))
        conv1_inputs.append("c1_bdq")
    else:
        conv1_inputs.append(const("c1_b", np.zeros(C, np.float32)))
    nodes.append(helper.make_node("Conv", conv1_inputs, ["c1"], name="conv1", pads=[1, 1, 1, 1]))
    relu_in = "c1"
    if batchnorm:
        bn = [
            const(f"bn_{k}", np.full(C, v, np.float32))
            for k, v in (("gamma", 1.0), ("beta", 0.0), ("mean", 0.0), ("var", 1.0))
        ]
        nodes.append(helper.make_node("BatchNormalization", ["c1", *bn], ["bn1"], name="bn1"))
        relu_in = "bn1"
    nodes.append(helper.make_node("Relu", [relu_in], ["r1"], name="relu1"))
    r1 = qdq("r1", "r1")
    nodes.append(helper.make_node("Conv", [r1, weight("c2", int4_conv)], ["c2"], name="conv2", pads=[1, 1, 1, 1]))
    c2 = qdq("c2", "c2") if residual_qdq else "c2"
    nodes.append(helper.make_node("Add", [c2, x], ["y"], name="add"))
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 9
    return model


def _rules(violations: list[Violation]) -> set[tuple[str, str]]:
    return {(v.rule, v.node) for v in violations}


def test_good_block_passes_and_is_valid_onnx():
    model = residual_block()
    onnx.checker.check_model(model, full_check=True)
    assert lint(model) == []
    summary = precision_summary(model)
    assert {n: p.precision for n, p in summary.items()} == {
        "conv1": "int8",
        "relu1": "float",
        "conv2": "int8",
        "add": "int8",
    }


def test_float_graph_passes_trivially():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="r")],
        "f",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    assert lint(helper.make_model(graph)) == []


def test_asymmetric_zero_point_names_each_qdq_node():
    found = _rules(lint(residual_block(act_zero_point=3)))
    assert {(trt_rules.SYMMETRIC, n) for n in ("in_Q", "in_DQ", "r1_Q", "r1_DQ", "c2_Q", "c2_DQ")} <= found


def test_uint8_activations_are_the_onnxruntime_form():
    violations = lint(residual_block(act_dtype=np.uint8, act_zero_point=128))
    signed = [v for v in violations if v.rule == trt_rules.SIGNED_INT8]
    assert {v.node for v in signed} == {"in_Q", "in_DQ", "r1_Q", "r1_DQ", "c2_Q", "c2_DQ"}
    assert "onnxruntime" in signed[0].message and "uint8" in signed[0].message


def test_per_channel_activation():
    violations = lint(residual_block(per_channel_act=True))
    assert _rules(violations) == {
        (trt_rules.PER_TENSOR_ACTIVATIONS, "r1_Q"),
        (trt_rules.PER_TENSOR_ACTIVATIONS, "r1_DQ"),
    }


def test_conv_weight_on_wrong_axis():
    violations = lint(residual_block(weight_axis=1))  # C_out == C_in, so only the axis is wrong
    assert (trt_rules.PER_CHANNEL_WEIGHTS, "c1_wDQ") in _rules(violations)
    assert "axis 0" in str(violations[0])


def test_int4_conv_is_rejected_with_the_reason():
    violations = [v for v in lint(residual_block(int4_conv=True, opset=21)) if v.rule == trt_rules.INT4_WEIGHT_ONLY]
    assert [v.node for v in violations] == ["c2_wDQ"]
    assert "conv2" in violations[0].message and "4-bit conv" in violations[0].message


def test_missing_residual_qdq():
    violations = lint(residual_block(residual_qdq=False))
    assert _rules(violations) == {(trt_rules.RESIDUAL_ADD_QDQ, "add")}
    assert "'c2'" in violations[0].message


def test_int32_bias():
    violations = lint(residual_block(int32_bias=True))
    assert _rules(violations) == {(trt_rules.FLOAT_BIAS, "c1_bDQ")}
    assert "conv1" in violations[0].message


def test_batchnorm_left_after_quantized_conv():
    assert _rules(lint(residual_block(batchnorm=True))) == {(trt_rules.BATCHNORM_FOLDED, "bn1")}


def _bn_behind_qdq_of(op_type: str) -> onnx.ModelProto:
    """x -> op -> Q/DQ -> BatchNormalization: a BN behind the Q/DQ of a conv's or a concat's output."""
    c = 4
    channels = c if op_type == "Conv" else 2 * c
    inits = [
        numpy_helper.from_array(np.full(channels, v, np.float32), f"bn_{k}")
        for k, v in (("gamma", 1.0), ("beta", 0.0), ("mean", 0.0), ("var", 1.0))
    ]
    inits += [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.int8(0), "z")]
    if op_type == "Conv":
        inits.append(numpy_helper.from_array(np.zeros((c, c, 1, 1), np.float32), "w"))
        first = helper.make_node("Conv", ["x", "w"], ["t"], name="op")
    else:
        first = helper.make_node("Concat", ["x", "x"], ["t"], name="op", axis=1)
    nodes = [
        first,
        helper.make_node("QuantizeLinear", ["t", "s", "z"], ["tq"], name="Q"),
        helper.make_node("DequantizeLinear", ["tq", "s", "z"], ["tdq"], name="DQ"),
        helper.make_node("BatchNormalization", ["tdq", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_batchnorm_behind_qdq_is_flagged_only_where_a_conv_could_take_it():
    # Behind a quantized conv output the BN should have been folded; behind a concat (DenseNet's
    # norm layers) there is no conv to fold it into, and TensorRT runs it as a Scale layer.
    assert (trt_rules.BATCHNORM_FOLDED, "bn") in _rules(lint(_bn_behind_qdq_of("Conv")))
    assert not any(rule == trt_rules.BATCHNORM_FOLDED for rule, _ in _rules(lint(_bn_behind_qdq_of("Concat"))))


def test_old_opset():
    assert (trt_rules.OPSET, "(model)") in _rules(lint(residual_block(opset=17)))


def _int4_matmul(
    *, k: int = 64, n: int = 32, block: int = 32, opset: int = 21, quantized_input: bool = False
) -> onnx.ModelProto:
    """x -> MatMul with an INT4 weight blocked along K; ``quantized_input`` puts int8 Q/DQ + Flatten on x."""
    w = helper.make_tensor("w", TensorProto.INT4, [k, n], np.zeros(k * n, np.int8).tolist())
    scale = numpy_helper.from_array(np.full((k // block if block else 1, n), 0.01, np.float32), "ws")
    attrs = {"axis": 0, "block_size": block} if block else {"axis": 1}
    if not block:
        scale = numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws")
    inits = [w, scale]
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws"], ["wdq"], name="w_DQ", **attrs)]
    x = "x"
    if quantized_input:
        inits += [numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.int8(0), "xz")]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="x_Q"),
            helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xdq"], name="x_DQ"),
            helper.make_node("Flatten", ["xdq"], ["xf"], name="flatten"),
        ]
        x = "xf"
    nodes.append(helper.make_node("MatMul", [x, "wdq"], ["y"], name="mm"))
    graph = helper.make_graph(
        nodes,
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def test_int4_weight_only_matmul_passes():
    model = _int4_matmul()
    onnx.checker.check_model(model, full_check=True)
    assert lint(model) == []
    assert precision_summary(model)["mm"].precision == "int4-weight"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"n": 31}, "even"),
        ({"block": 0}, "block_size"),
        ({"opset": 19}, "opset >= 21"),
        ({"quantized_input": True}, "weight-only"),
    ],
)
def test_int4_rules(kwargs, fragment):
    violations = lint(_int4_matmul(**kwargs))
    assert violations and all(v.node == "w_DQ" and v.rule == trt_rules.INT4_WEIGHT_ONLY for v in violations)
    assert any(fragment in v.message for v in violations)


def test_format_and_inspect(tmp_path):
    assert "OK" in format_lint([])
    text = format_lint(lint(residual_block(residual_qdq=False)))
    assert "1 violation" in text and "add" in text
    path = tmp_path / "block.onnx"
    onnx.save(residual_block(), path)
    report = inspect_text(path)
    assert "opset 19" in report and "OK" in report and "conv1" in report


# --- a realistic graph: onnxruntime's quantize_static on a torchvision model (random weights) -----------


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    """Export each torchvision model once per module: ``fp32_onnx(arch) -> path``."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    folder, paths = tmp_path_factory.mktemp("fp32"), {}

    def export(arch: str):
        if arch not in paths:
            paths[arch] = folder / f"{arch}.onnx"
            with warnings.catch_warnings():  # the TorchScript exporter is deprecated; it is the quick one here
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    getattr(torchvision.models, arch)().eval(),
                    (torch.randn(INPUT_SHAPE),),
                    paths[arch],
                    input_names=["input"],
                    opset_version=19,
                    dynamo=False,
                )
        return paths[arch]

    return export


INPUT_SHAPE = (1, 3, 64, 64)  # small input keeps calibration fast; the graph is the same


def ort_quantized(fp32_path, out_path, *, activation_type=None, **extra) -> onnx.ModelProto:
    """onnxruntime's quantize_static in QDQ form, symmetric int8 (the TensorRT form) unless told otherwise."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(
                [{"input": np.random.default_rng(i).standard_normal(INPUT_SHAPE, np.float32)} for i in range(2)]
            )

        def get_next(self):
            return next(self.batches, None)

    options = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False, **extra}
    quantize_static(
        fp32_path,
        out_path,
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=activation_type or QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options=options,
    )
    return onnx.load(out_path)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_quantize_static_tensorrt_form_passes(tmp_path, fp32_onnx, arch):
    model = ort_quantized(fp32_onnx(arch), tmp_path / "qdq.onnx")
    assert lint(model) == []
    convs = [p for p in precision_summary(model).values() if p.op_type == "Conv"]
    assert convs and all(p.precision == "int8" for p in convs)


def test_quantize_static_int32_bias_and_asymmetric_uint8_are_flagged(tmp_path, fp32_onnx):
    from onnxruntime.quantization import QuantType

    # onnxruntime's defaults for its CPU kernels: int32 bias, asymmetric uint8 activations
    model = ort_quantized(
        fp32_onnx("resnet18"),
        tmp_path / "qdq.onnx",
        QuantizeBias=True,
        ActivationSymmetric=False,
        activation_type=QuantType.QUInt8,
    )
    assert {trt_rules.FLOAT_BIAS, trt_rules.SIGNED_INT8, trt_rules.SYMMETRIC} <= {v.rule for v in lint(model)}


def test_format_lint_caps_lines_per_rule():
    violations = lint(residual_block(act_zero_point=3))
    assert "... and 4 more [symmetric-zero-point]" in format_lint(violations, max_per_rule=2)
    assert "more" not in format_lint(violations, max_per_rule=None)
