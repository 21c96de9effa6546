"""Small onnx-graphsurgeon passes, one job each, each returning the graph it changed.

The exporter traces quantizers as ``dfq::FakeQuant(index)`` marks; these passes turn the marks
into standard QuantizeLinear/DequantizeLinear nodes and integer weight initializers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dfq_deploy.errors import ExportError

MARK_OP = "FakeQuant"
MARK_DOMAIN = "dfq"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What one mark stands for, as written in ONNX.

    ``kind`` is ``activation`` (per tensor Q→DQ) or ``weight`` (integer initializer → DQ on
    ``axis``; with ``block_size``, blocks of that many elements along ``axis``, one scale each).
    ``dtype`` is the ONNX element type of the integer values.
    """

    name: str
    kind: str
    scale: np.ndarray
    zero_point: np.ndarray
    dtype: int
    axis: int | None = None
    integer_values: np.ndarray | None = None
    clip: tuple[float, float] | None = None
    block_size: int | None = None


_NP_FOR = {
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT4: np.int8,
    onnx.TensorProto.UINT4: np.uint8,
}


def _const(name: str, values: np.ndarray, dtype: int) -> gs.Constant:
    if dtype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        # graphsurgeon has no 4-bit numpy type: hand it a ready TensorProto through a LazyValues.
        tensor = onnx.helper.make_tensor(name, dtype, values.shape, values.astype(np.int64).ravel().tolist())
        return gs.Constant(name, gs.ir.tensor.LazyValues(tensor))
    return gs.Constant(name, np.array(values, dtype=_NP_FOR[dtype], order="C"))  # keeps 0-d scalars 0-d


def materialize_quantizers(graph: gs.Graph, specs: dict[int, QuantSpec]) -> gs.Graph:
    """Replace every ``dfq::FakeQuant`` mark by Q/DQ (activations) or int initializer + DQ (weights)."""
    for node in [n for n in graph.nodes if n.op == MARK_OP]:
        index = node.attrs.get("index")
        if index not in specs:
            raise ExportError(f"quantizer mark {node.name} refers to unknown quantizer {index}")
        spec = specs[index]
        source, out = node.inputs[0], node.outputs[0]
        base = spec.name
        scale = gs.Constant(f"{base}_scale", np.asarray(spec.scale, dtype=np.float32))
        zp = _const(f"{base}_zero_point", np.asarray(spec.zero_point), spec.dtype)
        attrs = {} if spec.axis is None else {"axis": spec.axis}
        if spec.block_size is not None:
            attrs["block_size"] = spec.block_size
        if spec.kind == "weight":
            if spec.integer_values is None:
                raise ExportError(f"weight quantizer {index} has no integer values")
            qweight = _const(f"{base}_quantized", spec.integer_values, spec.dtype)
            graph.nodes.append(
                gs.Node(
                    "DequantizeLinear", f"{base}/DequantizeLinear", attrs, inputs=[qweight, scale, zp], outputs=[out]
                )
            )
        else:
            # 4-bit has no numpy type: leave the tensor untyped and let shape inference type it.
            four_bit = spec.dtype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
            q_out = gs.Variable(
                f"{base}_quantized",
                dtype=None if four_bit else _NP_FOR[spec.dtype],
                shape=None if four_bit else out.shape,
            )
            if spec.clip is not None:
                low, high = spec.clip
                if source.inputs and source.inputs[0].op == "Relu":
                    # Same result (the input is >= 0), and onnxruntime's Relu+Clip fusion keeps a
                    # negative lower bound as it is, dropping the Relu (relative error 0.07 on a
                    # 4-bit symmetric graph, onnxruntime 1.32).
                    low = max(low, 0.0)
                clipped = gs.Variable(f"{base}_clipped", dtype=np.float32)
                bounds = [
                    gs.Constant(f"{base}_clip_{side}", np.array(v, dtype=np.float32))
                    for side, v in zip(("min", "max"), (low, high), strict=False)
                ]
                graph.nodes.append(gs.Node("Clip", f"{base}/Clip", inputs=[source, *bounds], outputs=[clipped]))
                source = clipped
            graph.nodes.append(
                gs.Node("QuantizeLinear", f"{base}/QuantizeLinear", attrs, inputs=[source, scale, zp], outputs=[q_out])
            )
            graph.nodes.append(
                gs.Node("DequantizeLinear", f"{base}/DequantizeLinear", attrs, inputs=[q_out, scale, zp], outputs=[out])
            )
        node.outputs.clear()
        node.inputs.clear()
    return graph.cleanup().toposort()


def fold_weight_transposes(graph: gs.Graph) -> gs.Graph:
    """Write a Linear's weight pre-transposed where the exporter put a Transpose behind its DQ.

    A Linear on a tensor of rank > 2 (ConvNeXt's channels-last MLP) is exported as
    ``MatMul(x, Transpose(W))``; the integer kernels of onnxruntime and TensorRT match only
    ``DQ(weight) -> MatMul``, so the DQ reads ``W`` transposed, with its per-channel axis moved to 1.
    The DQ keeps its name, which is how reports find the layer's op.
    """
    for dq in [n for n in graph.nodes if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant)]:
        out = dq.outputs[0]
        users = list(out.outputs)
        if (
            len(users) != 1
            or users[0].op != "Transpose"
            or out in graph.outputs
            or "block_size" in dq.attrs
            or dq.attrs.get("axis", 1) != 0
        ):
            continue
        transpose = users[0]
        weight = dq.inputs[0].values
        if (
            not isinstance(weight, np.ndarray)
            or weight.ndim != 2
            or list(transpose.attrs.get("perm", [1, 0])) != [1, 0]
        ):
            continue
        dq.inputs[0] = gs.Constant(dq.inputs[0].name, np.ascontiguousarray(weight.T))
        dq.attrs["axis"] = 1
        dq.outputs = [transpose.outputs[0]]
        transpose.outputs.clear()
    return graph.cleanup()


def drop_custom_opset(model: onnx.ModelProto, domain: str = MARK_DOMAIN) -> onnx.ModelProto:
    """Remove the marks' opset import once no node of that domain is left."""
    if any(n.domain == domain for n in model.graph.node):
        raise ExportError(f"nodes of domain {domain!r} are left in the graph after materialisation")
    keep = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def name_unnamed_nodes(graph: gs.Graph) -> gs.Graph:
    """Give every node a unique name (TensorRT and onnxruntime messages refer to nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{i}"
        seen.add(node.name)
    return graph


def inline_constant_identities(graph: gs.Graph) -> gs.Graph:
    """Replace ``Identity(initializer)`` (the exporter's de-duplicated biases) by the initializer."""
    for node in [n for n in graph.nodes if n.op == "Identity" and isinstance(n.inputs[0], gs.Constant)]:
        const, out = node.inputs[0], node.outputs[0]
        for consumer in list(out.outputs):
            consumer.inputs[consumer.inputs.index(out)] = const
        if out in graph.outputs:
            continue
        node.outputs.clear()
    return graph.cleanup()


def _int_min(dtype: int) -> int:
    return {
        onnx.TensorProto.UINT8: 0,
        onnx.TensorProto.INT8: -128,
        onnx.TensorProto.UINT4: 0,
        onnx.TensorProto.INT4: -8,
    }[dtype]


def _int_max(dtype: int) -> int:
    return {
        onnx.TensorProto.UINT8: 255,
        onnx.TensorProto.INT8: 127,
        onnx.TensorProto.UINT4: 15,
        onnx.TensorProto.INT4: 7,
    }[dtype]


def drop_activations_before_quantize(graph: gs.Graph, specs: dict[str, QuantSpec]) -> gs.Graph:
    """Remove a Relu/Clip whose only consumer is a QuantizeLinear that already clips the same way.

    With a zero point at the grid's minimum, ``Q(relu(x)) == Q(x)`` exactly, and ``Q(clip(x, 0, M))
    == Q(x)`` when the grid's top lies within M. onnxruntime then sees ``Conv → Q`` and fuses a
    QLinearConv/QLinearAdd; the result is bit-identical. ``specs`` maps Q node names to their specs.
    """
    for node in [n for n in graph.nodes if n.op in ("Relu", "Clip")]:
        out = node.outputs[0]
        consumers = list(out.outputs)
        if (
            not consumers
            or out in graph.outputs
            or any(c.op != "QuantizeLinear" or c.name not in specs for c in consumers)
        ):
            continue
        if not all(_clip_is_redundant(node, specs[c.name]) for c in consumers):
            continue
        source = node.inputs[0]
        for consumer in consumers:
            consumer.inputs[0] = source
        node.outputs.clear()
    return graph.cleanup()


def _clip_is_redundant(node: gs.Node, spec: QuantSpec) -> bool:
    zp = int(np.asarray(spec.zero_point).reshape(-1)[0])
    scale = float(np.asarray(spec.scale).reshape(-1)[0])
    if zp != _int_min(spec.dtype):
        return False
    if node.op == "Relu":
        return True
    if len(node.inputs) < 3 or not all(isinstance(b, gs.Constant) for b in node.inputs[1:3]):
        return False
    low, high = float(node.inputs[1].values), float(node.inputs[2].values)
    top = scale * (_int_max(spec.dtype) - zp)
    # Values above ``high`` would land on the top code anyway when the grid ends within half a step.
    return low == 0.0 and top - scale / 2 <= high


def constants_to_initializers(graph: gs.Graph) -> gs.Graph:
    """Turn ``Constant`` nodes into initializers, so later passes can read their values."""
    for node in [n for n in graph.nodes if n.op == "Constant" and "value" in n.attrs]:
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        const = gs.Constant(out.name, np.asarray(node.attrs["value"].values))
        for consumer in list(out.outputs):
            consumer.inputs[consumer.inputs.index(out)] = const
        node.outputs.clear()
    return graph.cleanup()
