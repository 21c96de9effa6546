"""The graph index that the TensorRT lint (:mod:`trt_rules`) and the precision summary
(:mod:`trt_precision`) read: producers, consumers, constants and element types of an ONNX graph,
computed once, and the Q/DQ questions both ask of it (is this a weight? which integer type?)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

QDQ = ("QuantizeLinear", "DequantizeLinear")
FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
# The only ops TensorRT takes INT4 (weight-only, blocked) weights on.
INT4_CONSUMERS = ("Gemm", "MatMul")


class GraphIndex:
    """Producers, consumers, constants and element types of a graph, computed once."""

    def __init__(self, model: onnx.ModelProto):
        try:
            # Shape inference fills element types of intermediate tensors (used to skip int64 shape
            # arithmetic); a graph it cannot handle is still linted, with fewer types known.
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - inference is an optional refinement here
            pass
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.nodes = list(graph.node)
        self.names = {id(n): n.name or f"{n.op_type}#{i}" for i, n in enumerate(self.nodes)}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, i))
        self.initializers = {t.name: t for t in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.initializers[node.output[0]] = value
        self.dtype: dict[str, int] = {}
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            self.dtype[vi.name] = vi.type.tensor_type.elem_type
        for name, tensor in self.initializers.items():
            self.dtype[name] = tensor.data_type

    def name(self, node: onnx.NodeProto) -> str:
        return self.names[id(node)]

    def constant(self, tensor: str) -> onnx.TensorProto | None:
        """The constant behind ``tensor``, looking through Identity (quantize_static leaves those)."""
        while tensor not in self.initializers:
            node = self.producer.get(tensor)
            if node is None or node.op_type != "Identity":
                return None
            tensor = node.input[0]
        return self.initializers[tensor]

    def array(self, tensor: str) -> np.ndarray | None:
        const = self.constant(tensor)
        return None if const is None else numpy_helper.to_array(const)

    def is_weight(self, qdq: onnx.NodeProto) -> bool:
        """True when a Q/DQ node's data input is a constant, directly or through a constant Q."""
        data = qdq.input[0]
        if self.constant(data) is not None:
            return True
        src = self.producer.get(data)
        return src is not None and src.op_type == "QuantizeLinear" and self.constant(src.input[0]) is not None

    def quant_type(self, qdq: onnx.NodeProto) -> int:
        """Element type of the integer side of a Q or DQ node (ONNX defaults to uint8)."""
        if len(qdq.input) > 2 and qdq.input[2]:
            zp = self.constant(qdq.input[2])
            if zp is not None:
                return zp.data_type
            return self.dtype.get(qdq.input[2], TensorProto.UNDEFINED)
        if qdq.op_type == "DequantizeLinear":
            src = self.dtype.get(qdq.input[0])
            if src:
                return src
            producer = self.producer.get(qdq.input[0])
            return self.quant_type(producer) if producer is not None and producer.op_type in QDQ else 0
        out_dtype = attr(qdq, "output_dtype", 0)
        return out_dtype or TensorProto.UINT8


def attr(node: onnx.NodeProto, name: str, default):
    """The value of ``node``'s attribute ``name``, ``default`` when it has none."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def type_name(elem_type: int) -> str:
    """An ONNX element type as a lower-case name (``int8``), ``unknown`` for UNDEFINED."""
    return TensorProto.DataType.Name(elem_type).lower() if elem_type else "unknown"


def is_float_activation(idx: GraphIndex, tensor: str) -> bool:
    """True for a computed (not constant) tensor of a float type, or of unknown type."""
    return idx.constant(tensor) is None and idx.dtype.get(tensor, TensorProto.FLOAT) in FLOATS
