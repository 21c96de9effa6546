"""Lint of TensorRT's explicit-quantization rules, run on CPU on the ONNX graph before any build.

TensorRT (and TensorRT-RTX) accept a Q/DQ graph only in one form: symmetric int8 with zero point 0,
per-channel scales only on constant weights, activations per tensor, INT4 only as weight-only
block-quantized DequantizeLinear on Gemm/MatMul weights, float biases. A graph outside that form either
fails to parse with a terse message, or — worse — builds and silently runs some layers in float.
:func:`lint` names each node that breaks a rule, so the fix is obvious before a GPU is involved.

:func:`inspect_text` adds :func:`dfq_deploy.converters.trt_precision.precision_summary` (per op, whether
its inputs arrive as int8, int4 weights or float) to the lint; both read the graph through
:class:`dfq_deploy.converters.trt_graph.GraphIndex`.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import TensorProto

from dfq_deploy.converters.trt_graph import INT4_CONSUMERS, QDQ, GraphIndex, attr, is_float_activation, type_name
from dfq_deploy.converters.trt_precision import format_precision_summary, precision_summary

# Rule identifiers: stable strings, so tests and users can filter on them.
OPSET = "opset"
SIGNED_INT8 = "signed-int8"
SYMMETRIC = "symmetric-zero-point"
CONSTANT_QPARAMS = "constant-qparams"
PER_CHANNEL_WEIGHTS = "per-channel-weights"
PER_TENSOR_ACTIVATIONS = "per-tensor-activations"
INT4_WEIGHT_ONLY = "int4-weight-only"
RESIDUAL_ADD_QDQ = "residual-add-qdq"
BATCHNORM_FOLDED = "batchnorm-folded"
FLOAT_BIAS = "float-bias"

MIN_OPSET_INT8 = 19
MIN_OPSET_INT4 = 21
_CONVS = ("Conv", "ConvTranspose")
_DATA_MOVEMENT = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


@dataclasses.dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` is one of this module's rule ids, ``node`` the ONNX node's name."""

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.message} [{self.rule}]"


def lint(model: onnx.ModelProto) -> list[Violation]:
    """Every place where ``model`` breaks TensorRT's explicit-quantization rules (empty: it follows them).

    A graph without QuantizeLinear/DequantizeLinear is a float graph and passes trivially.
    """
    idx = GraphIndex(model)
    qdq_nodes = [n for n in idx.nodes if n.op_type in QDQ]
    if not qdq_nodes:
        return []
    out: list[Violation] = []
    int8_nodes = [n for n in qdq_nodes if idx.quant_type(n) in (TensorProto.INT8, TensorProto.UINT8)]
    if int8_nodes and idx.opset < MIN_OPSET_INT8:
        out.append(
            Violation(
                OPSET,
                "(model)",
                f"INT8 Q/DQ needs ONNX opset >= {MIN_OPSET_INT8}, "
                f"the model imports opset {idx.opset}; re-export with opset {MIN_OPSET_INT8}",
            )
        )
    for node in qdq_nodes:
        out += _check_qparams(idx, node)
        if idx.quant_type(node) in (TensorProto.INT4, TensorProto.UINT4):
            out += _check_int4(idx, node)
        else:
            out += _check_granularity(idx, node)
    out += _check_residual_adds(idx)
    out += _check_batchnorm(idx)
    return out


def _check_qparams(idx: GraphIndex, node: onnx.NodeProto) -> list[Violation]:
    name, qtype = idx.name(node), idx.quant_type(node)
    if qtype == TensorProto.INT32:
        consumers = ", ".join(sorted(idx.name(c) for c, _ in idx.consumers.get(node.output[0], [])))
        return [
            Violation(
                FLOAT_BIAS,
                name,
                f"dequantizes an int32 tensor (a quantized bias, feeding "
                f"{consumers or 'nothing'}); TensorRT rejects int32 behind DequantizeLinear — "
                "keep the bias in float",
            )
        ]
    out = []
    if qtype in (TensorProto.UINT8, TensorProto.UINT4):
        out.append(
            Violation(
                SIGNED_INT8,
                name,
                f"{node.op_type} uses {type_name(qtype)}, the onnxruntime "
                "CPU form; TensorRT takes signed int8/int4 only — export with --target tensorrt",
            )
        )
    scale = idx.array(node.input[1])
    if scale is None:
        out.append(
            Violation(
                CONSTANT_QPARAMS,
                name,
                f"scale '{node.input[1]}' is not a constant; TensorRT needs scales known at build time",
            )
        )
    elif not np.all(np.asarray(scale, dtype=np.float64) > 0):
        out.append(Violation(CONSTANT_QPARAMS, name, "scales must be positive"))
    if len(node.input) > 2 and node.input[2]:
        zp = idx.array(node.input[2])
        if zp is None:
            out.append(Violation(CONSTANT_QPARAMS, name, f"zero point '{node.input[2]}' is not a constant"))
        elif np.any(np.asarray(zp, dtype=np.int64) != 0):
            nonzero = np.unique(np.asarray(zp, dtype=np.int64)[np.asarray(zp) != 0])[:4].tolist()
            out.append(
                Violation(
                    SYMMETRIC,
                    name,
                    f"zero point is {nonzero} (asymmetric); TensorRT supports "
                    "symmetric quantization with zero point 0 only",
                )
            )
    return out


def _check_granularity(idx: GraphIndex, node: onnx.NodeProto) -> list[Violation]:
    name = idx.name(node)
    scale = idx.array(node.input[1])
    if scale is None or scale.size <= 1:
        return []
    if not idx.is_weight(node):
        return [
            Violation(
                PER_TENSOR_ACTIVATIONS,
                name,
                f"activation '{node.input[0]}' has {scale.size} scales; "
                "TensorRT quantizes activations per tensor (one scalar scale)",
            )
        ]
    if attr(node, "block_size", 0):
        return [Violation(INT4_WEIGHT_ONLY, name, "block quantization is supported for INT4 weights only")]
    weight = idx.array(node.input[0])
    if weight is None:  # fake-quant form: float constant -> Q -> DQ
        weight = idx.array(idx.producer[node.input[0]].input[0])
    axis = attr(node, "axis", 1)
    axis = axis + weight.ndim if axis < 0 else axis
    out = []
    if scale.ndim != 1 or not 0 <= axis < weight.ndim or scale.size != weight.shape[axis]:
        out.append(
            Violation(
                PER_CHANNEL_WEIGHTS,
                name,
                f"{scale.size} scales for a weight of shape "
                f"{list(weight.shape)} on axis {axis}; per-channel needs one scale per element "
                "of that axis",
            )
        )
    conv_users = [idx.name(c) for c, i in _consumers_through_q(idx, node) if c.op_type == "Conv" and i == 1]
    if conv_users and axis != 0:
        out.append(
            Violation(
                PER_CHANNEL_WEIGHTS,
                name,
                f"conv weight of {', '.join(conv_users)} is quantized on "
                f"axis {axis}; TensorRT needs axis 0 (output channels)",
            )
        )
    return out


def _consumers_through_q(idx: GraphIndex, node: onnx.NodeProto) -> list[tuple[onnx.NodeProto, int]]:
    """Consumers of a DQ's output, or of the DQ behind a Q (fake-quant weights: W -> Q -> DQ -> Conv)."""
    users = idx.consumers.get(node.output[0], [])
    if node.op_type == "QuantizeLinear":
        return [u for dq, _ in users if dq.op_type == "DequantizeLinear" for u in idx.consumers.get(dq.output[0], [])]
    return users


def _check_int4(idx: GraphIndex, node: onnx.NodeProto) -> list[Violation]:
    """INT4 is a weight-only, block-quantized DequantizeLinear feeding the weight of Gemm/MatMul."""
    name = idx.name(node)
    if node.op_type != "DequantizeLinear" or idx.constant(node.input[0]) is None:
        return [
            Violation(
                INT4_WEIGHT_ONLY,
                name,
                "INT4 is weight-only in TensorRT: use DequantizeLinear on a "
                "constant int4 weight; activations stay int8 or float",
            )
        ]
    problems = _int4_consumer_problems(idx, node)
    if not problems:  # the layout checks are moot for a consumer that cannot take INT4 at all
        problems = _int4_layout_problems(idx, node) + _int4_activation_problems(idx, node)
    return [Violation(INT4_WEIGHT_ONLY, name, message) for message in problems]


def _int4_consumer_problems(idx: GraphIndex, node: onnx.NodeProto) -> list[str]:
    """Readers of the INT4 weight other than the weight input of a Gemm/MatMul."""
    out = []
    bad_users = [c for c, i in idx.consumers.get(node.output[0], []) if c.op_type not in INT4_CONSUMERS or i != 1]
    for user in bad_users:
        what = f"{user.op_type} {idx.name(user)}"
        why = " — TensorRT has no 4-bit conv kernels; keep conv layers at INT8" if user.op_type in _CONVS else ""
        out.append(f"INT4 weights feed {what}; INT4 is supported only as the weight of Gemm/MatMul{why}")
    return out


def _int4_layout_problems(idx: GraphIndex, node: onnx.NodeProto) -> list[str]:
    """Opset, block quantization along exactly one axis, and an even last dimension (two values a byte)."""
    out = []
    if idx.opset < MIN_OPSET_INT4:
        out.append(f"INT4 needs ONNX opset >= {MIN_OPSET_INT4}, the model imports opset {idx.opset}")
    weight, scale = idx.array(node.input[0]), idx.array(node.input[1])
    block = attr(node, "block_size", 0)
    if not block:
        out.append("INT4 weights must be block-quantized (block_size > 0)")
    elif scale is not None and scale.ndim == weight.ndim:
        blocked = [d for d in range(weight.ndim) if scale.shape[d] != weight.shape[d]]
        if len(blocked) != 1:
            out.append(
                f"scale shape {list(scale.shape)} vs weight "
                f"{list(weight.shape)}: block quantization needs exactly one blocked axis"
            )
    else:
        out.append("block-quantized scale must have the weight's rank")
    if weight.ndim and weight.shape[-1] % 2:
        out.append(
            f"INT4 weight's last dimension is {weight.shape[-1]}; "
            "TensorRT packs two int4 values per byte and needs it even"
        )
    return out


def _int4_activation_problems(idx: GraphIndex, node: onnx.NodeProto) -> list[str]:
    """A Gemm/MatMul with INT4 weights whose activation comes out of a DequantizeLinear."""
    out = []
    for user, _ in idx.consumers.get(node.output[0], []):
        source = _source_through_data_movement(idx, user.input[0])
        if source is not None and source.op_type == "DequantizeLinear":
            out.append(
                f"the activation of {user.op_type} {idx.name(user)} comes "
                f"from {type_name(idx.quant_type(source))} DequantizeLinear {idx.name(source)}; INT4 "
                "is weight-only in TensorRT, keep that input float (tensorrt_rtx 1.7 fails to build "
                "a blocked INT4 Gemm behind INT8 Q/DQ)"
            )
    return out


def _source_through_data_movement(idx: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The producer of ``tensor``, looking through ops that only move values (Flatten, Reshape, ...)."""
    node = idx.producer.get(tensor)
    while node is not None and node.op_type in _DATA_MOVEMENT:
        node = idx.producer.get(node.input[0])
    return node


def _check_residual_adds(idx: GraphIndex) -> list[Violation]:
    """An Add of two activations runs in INT8 only when both inputs come out of a DequantizeLinear."""
    out = []
    for node in idx.nodes:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        if not all(is_float_activation(idx, t) for t in node.input):
            continue
        missing = [t for t in node.input if getattr(idx.producer.get(t), "op_type", None) != "DequantizeLinear"]
        if missing:
            out.append(
                Violation(
                    RESIDUAL_ADD_QDQ,
                    idx.name(node),
                    "residual Add input(s) "
                    f"{', '.join(repr(t) for t in missing)} not behind QuantizeLinear/DequantizeLinear;"
                    " put Q/DQ on both inputs so the Add fuses into the INT8 conv",
                )
            )
    return out


def _check_batchnorm(idx: GraphIndex) -> list[Violation]:
    out = []
    for node in idx.nodes:
        if node.op_type != "BatchNormalization":
            continue
        src = idx.producer.get(node.input[0])
        quantized_conv = (
            src is not None
            and src.op_type in _CONVS
            and any(getattr(idx.producer.get(t), "op_type", None) == "DequantizeLinear" for t in src.input)
        )
        if quantized_conv or _dequantized_conv_output(idx, src):
            out.append(
                Violation(
                    BATCHNORM_FOLDED,
                    idx.name(node),
                    f"BatchNormalization behind "
                    f"{src.op_type} {idx.name(src)} in a quantized graph; fold BN into the conv "
                    "before quantizing, or the int8 weights do not match what runs",
                )
            )
    return out


def format_lint(violations: list[Violation], *, max_per_rule: int | None = 8) -> str:
    """Violations as text grouped by rule, at most ``max_per_rule`` lines each (``None``: all)."""
    if not violations:
        return "TensorRT rules: OK (no violations)"
    by_rule: dict[str, list[Violation]] = defaultdict(list)
    for v in violations:
        by_rule[v.rule].append(v)
    lines = [
        f"TensorRT rules: {len(violations)} violation(s) "
        f"({', '.join(f'{r}: {len(vs)}' for r, vs in sorted(by_rule.items()))})"
    ]
    for rule, vs in sorted(by_rule.items()):
        vs = sorted(vs, key=lambda v: v.node)
        shown = vs if max_per_rule is None else vs[:max_per_rule]
        lines += [f"  {v}" for v in shown]
        if len(shown) < len(vs):
            lines.append(f"  ... and {len(vs) - len(shown)} more [{rule}]")
    return "\n".join(lines)


def inspect_text(path: str | os.PathLike) -> str:
    """What ``dfq-deploy inspect MODEL.onnx`` prints: opset, Q/DQ counts, the lint and the precision table."""
    model = onnx.load(os.fspath(path))
    ops = Counter(n.op_type for n in model.graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    head = [
        f"{os.fspath(path)}: opset {opset}, {len(model.graph.node)} nodes, "
        f"{ops['QuantizeLinear']} QuantizeLinear, {ops['DequantizeLinear']} DequantizeLinear"
    ]
    return "\n".join(head + [format_lint(lint(model)), "", format_precision_summary(precision_summary(model))])


def _dequantized_conv_output(idx: GraphIndex, src: onnx.NodeProto | None) -> bool:
    """A DequantizeLinear whose QuantizeLinear reads a conv's output: a BN there could have been folded.

    A BN behind a Q/DQ of anything else (DenseNet's norm after a concat, a pre-activation block's
    norm after the residual add) has no conv to fold into; TensorRT runs it as a Scale layer on the
    dequantized tensor, which is valid explicit quantization (TensorRT-RTX builds DenseNet-121 so).
    """
    if src is None or src.op_type != "DequantizeLinear":
        return False
    quantize = idx.producer.get(src.input[0])
    if quantize is None or quantize.op_type != "QuantizeLinear":
        return False
    upstream = idx.producer.get(quantize.input[0])
    return upstream is not None and upstream.op_type in _CONVS
