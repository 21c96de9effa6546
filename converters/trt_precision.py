"""Per op, whether its inputs arrive as int8 (from a DequantizeLinear of int8 data), int4 weights, or
float: what a TensorRT engine *can* run in integer arithmetic, read from the ONNX graph on CPU."""

from __future__ import annotations

import dataclasses
from collections import Counter

import onnx

from dfq_deploy.converters.trt_graph import INT4_CONSUMERS, QDQ, GraphIndex, is_float_activation, type_name

# Inputs that carry numbers the op computes with; a Conv/Gemm bias stays float and is not counted.
_COMPUTE_INPUTS = {"Conv": (0, 1), "ConvTranspose": (0, 1), "Gemm": (0, 1), "MatMul": (0, 1)}


@dataclasses.dataclass(frozen=True)
class OpPrecision:
    """How one op's inputs arrive: ``inputs`` pairs each counted input name with its kind."""

    op_type: str
    precision: str  # "int8", "int4-weight", "float", or "mixed (int8+float)" and the like
    inputs: tuple[tuple[str, str], ...]


def precision_summary(model: onnx.ModelProto) -> dict[str, OpPrecision]:
    """Per op (by node name, in graph order): which of its inputs arrive quantized and which in float.

    An input's kind is the integer type of the DequantizeLinear producing it (``int8``, ``int4``,
    ``uint8``), else ``float``. Q/DQ, Constant and Identity nodes, constant float inputs (biases,
    shapes) and non-float tensors (shape arithmetic) are left out.
    """
    idx = GraphIndex(model)
    summary: dict[str, OpPrecision] = {}
    for node in idx.nodes:
        if node.op_type in (*QDQ, "Constant", "Identity"):
            continue
        positions = _COMPUTE_INPUTS.get(node.op_type, range(len(node.input)))
        kinds = []
        for i in positions:
            if i >= len(node.input) or not node.input[i]:
                continue
            tensor = node.input[i]
            src = idx.producer.get(tensor)
            if src is not None and src.op_type == "DequantizeLinear":
                kinds.append((tensor, type_name(idx.quant_type(src))))
            elif is_float_activation(idx, tensor) or (i == 1 and node.op_type in _COMPUTE_INPUTS):
                kinds.append((tensor, "float"))
        summary[idx.name(node)] = OpPrecision(node.op_type, _op_precision(node, kinds), tuple(kinds))
    return summary


def _op_precision(node: onnx.NodeProto, kinds: list[tuple[str, str]]) -> str:
    seen = [k for _, k in kinds]
    if not seen:
        return "n/a"
    if len(set(seen)) == 1:
        return seen[0]
    if node.op_type in INT4_CONSUMERS and len(seen) > 1 and seen[1] == "int4" and seen[0] == "float":
        return "int4-weight"
    return f"mixed ({'+'.join(sorted(set(seen)))})"


def format_precision_summary(summary: dict[str, OpPrecision]) -> str:
    """A fixed-width table of :func:`precision_summary`, with a count per precision at the end."""
    if not summary:
        return "(no ops)"
    width = max(len(n) for n in summary)
    op_width = max(len(p.op_type) for p in summary.values())
    lines = [f"{'node':<{width}}  {'op':<{op_width}}  precision"]
    lines += [f"{n:<{width}}  {p.op_type:<{op_width}}  {p.precision}" for n, p in summary.items()]
    counts = Counter(p.precision for p in summary.values())
    lines.append("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)
