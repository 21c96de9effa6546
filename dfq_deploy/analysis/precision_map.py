"""Precision map: per layer, the precision asked for and the precision the runtime really used.

A Q/DQ graph only *asks* for integer arithmetic; each runtime decides per op whether its integer
kernels match the pattern. onnxruntime tells us through its optimized graph (QLinearConv /
ConvInteger / QGemm are integer kernels, Conv / FusedConv / Gemm are float), OpenVINO through its
compiled model's runtime graph (each primitive's ``runtimePrecision``), TensorRT through the
engine inspector's per-layer JSON (``engine_layers`` in the engine metadata, GPU only). Where the two
differ we say why, from the shape of the Q/DQ graph around the layer.

Layers are found in graph order from their weight quantizer: the op reading
``<layer>.weight_quantizer/DequantizeLinear`` is the layer's op. onnxruntime keeps that op's name
in the node it becomes (``/conv1/Conv`` -> ``/conv1/Conv_token_1`` when fused, unchanged when not)
and an integer kernel reads the weight initializer ``<layer>.weight_quantizer_quantized``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import onnx
from onnx import TensorProto

from dfq_deploy.analysis.engine_layers import tensorrt_format_dtype
from dfq_deploy.analysis.fidelity import QdqGraph
from dfq_deploy.errors import BadInputError
from dfq_deploy.quant.quantize import LayerInfo
from dfq_deploy.runtimes.openvino import PRECISION_NAMES as OPENVINO_PRECISION_NAMES
from dfq_deploy.runtimes.openvino import RuntimeLayer

# onnxruntime op types that compute on integers, with the precision they really use.
INTEGER_KERNELS = {
    "QLinearConv": "int8",
    "ConvInteger": "int8",
    "QGemm": "int8",
    "QLinearMatMul": "int8",
    "MatMulInteger": "int8",
    "MatMulIntegerToFloat": "int8",
    "DynamicQuantizeMatMul": "int8",
    "MatMulNBits": "int4-weight",
}
_TOKEN_SUFFIX = re.compile(r"_token_\d+$")
_FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4)
_CONVS = ("Conv", "ConvTranspose")
_FLOAT_KINDS = ("float", "fp16", "bf16")


@dataclasses.dataclass(frozen=True)
class LayerPrecision:
    """One layer: ``asked`` (``int8``, ``int4``, ``w4a8``, ``float``), ``used`` (``int8``, ``float``,
    ``fp16``, ``int4-weight`` or ``unknown``), the runtime ``kernel`` and, where they differ, ``reason``."""

    layer: str
    kind: str
    onnx_node: str
    asked: str
    used: str
    kernel: str
    reason: str | None = None

    @classmethod
    def untraced(cls, layer: LayerInfo, op: onnx.NodeProto, asked: str, reason: str) -> LayerPrecision:
        """The row of a layer whose runtime kernel could not be found: precision ``unknown``, and why."""
        return cls(layer.name, layer.kind, op.name, asked, "unknown", "—", reason)

    @property
    def ran_in_float(self) -> bool:
        """Asked for integer arithmetic, ran in floating point."""
        return asks_integer_arithmetic(self.asked) and self.used in _FLOAT_KINDS


@dataclasses.dataclass(frozen=True)
class PrecisionMap:
    """Per-layer precision on one runtime, in graph order."""

    runtime: str
    layers: tuple[LayerPrecision, ...]

    def fallbacks(self) -> list[LayerPrecision]:
        """Layers asked for INT8/INT4 that ran in float."""
        return [layer for layer in self.layers if layer.ran_in_float]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrecisionMap:
        """Read :meth:`as_dict`'s form back (``ran_in_float`` is recomputed from the rows)."""
        return cls(data.get("runtime", "runtime"), tuple(LayerPrecision(**row) for row in data.get("layers", [])))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for report.json."""
        return {
            "runtime": self.runtime,
            "ran_in_float": [layer.layer for layer in self.fallbacks()],
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
        }


def asks_integer_arithmetic(asked: str) -> bool:
    """False for ``float`` and weight-only layers (``w4-only``): those compute in floating point by design."""
    return asked != "float" and not asked.endswith("-only")


def asked_precision(weight_bits: int | None, act_bits: int | None) -> str:
    """``int8`` / ``int4`` when weights and input share a width, ``w4a8`` style otherwise, ``float``."""
    if weight_bits is None:
        return "float"
    if act_bits is None:
        return f"w{weight_bits}-only"
    return f"int{weight_bits}" if weight_bits == act_bits else f"w{weight_bits}a{act_bits}"


def layers_from_graph(qdq_model: onnx.ModelProto) -> list[LayerInfo]:
    """The quantized layers of an exported graph, for when no QuantModel is at hand.

    Names come from ``<layer>.weight_quantizer/DequantizeLinear``; the input width from the input's
    integer type; the weight width is the smallest that holds the stored integers (the exporter keeps
    any width up to 8 in an int8 container).
    """
    graph = QdqGraph(qdq_model)
    layers = []
    for node in graph.nodes:
        if not node.name.endswith(".weight_quantizer/DequantizeLinear"):
            continue
        name = node.name.removesuffix(".weight_quantizer/DequantizeLinear")
        op = graph.weight_consumer(name)
        layers.append(LayerInfo(name, op.op_type, _stored_bits(graph, node), _input_bits(graph, op)))
    return layers


def _stored_bits(graph: QdqGraph, dq: onnx.NodeProto) -> int:
    values = onnx.numpy_helper.to_array(graph.inits[dq.input[0]]).astype(int)
    if len(dq.input) > 2 and dq.input[2] in graph.inits:  # uint8-stored weights sit around zero point 128
        zero_point = onnx.numpy_helper.to_array(graph.inits[dq.input[2]]).astype(int)
        if zero_point.ndim == 1:  # per channel along ``axis``
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            values = values - zero_point.reshape([-1 if d == axis else 1 for d in range(values.ndim)])
        elif zero_point.ndim == 0:
            values = values - zero_point
        # (blocked INT4 zero points are 0: that form is symmetric)
    peak = int(abs(values).max()) if values.size else 0
    return max(2, peak.bit_length() + 1)


def _input_bits(graph: QdqGraph, op: onnx.NodeProto) -> int | None:
    dq = graph.producer.get(op.input[0])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    return 4 if _zero_point_type(graph, dq) in _FOUR_BIT else 8


def _zero_point_type(graph: QdqGraph, qdq: onnx.NodeProto) -> int:
    if len(qdq.input) > 2 and qdq.input[2] in graph.inits:
        return graph.inits[qdq.input[2]].data_type
    return TensorProto.UINT8  # ONNX's default when the zero point is left out


def precision_map_onnxruntime(
    qdq_model: onnx.ModelProto | str | os.PathLike,
    *,
    layers: Sequence[LayerInfo] | None = None,
    device: str = "cpu",
    threads: int | None = None,
    optimized: onnx.ModelProto | None = None,
) -> PrecisionMap:
    """What onnxruntime (``device``) really runs each layer in, read from its optimized graph.

    ``layers`` (``QuantModel.layers``) give the asked precision; without them it is read from the graph.
    ``optimized`` is onnxruntime's optimized graph of ``qdq_model`` when the caller has it already
    (:func:`~dfq_deploy.runtimes.onnxruntime.optimized_graph` on ``device``); else it is computed here.
    """
    from dfq_deploy.runtimes.onnxruntime import optimized_graph

    model = qdq_model if isinstance(qdq_model, onnx.ModelProto) else onnx.load(os.fspath(qdq_model))
    layers = list(layers) if layers is not None else layers_from_graph(model)
    if optimized is None:
        optimized = optimized_graph(model.SerializeToString(), device=device, threads=threads)
    graph = QdqGraph(model)
    rows = [_onnxruntime_row(graph, list(optimized.graph.node), layer) for layer in layers]
    return PrecisionMap(f"onnxruntime-{device}", tuple(rows))


def _onnxruntime_row(graph: QdqGraph, optimized: list[onnx.NodeProto], layer: LayerInfo) -> LayerPrecision:
    asked = asked_precision(layer.weight_bits, layer.act_bits)
    if layer.weight_bits is None:
        return LayerPrecision(layer.name, layer.kind, "", asked, "float", "—")
    op = graph.weight_consumer(layer.name)
    node = _optimized_node(optimized, op, layer.name)
    if node is None:
        return LayerPrecision.untraced(
            layer, op, asked, f"no node of the optimized graph could be traced back to {op.name}"
        )
    used = INTEGER_KERNELS.get(node.op_type, "float")
    reason = _onnxruntime_reason(graph, op, layer) if used == "float" and asks_integer_arithmetic(asked) else None
    return LayerPrecision(layer.name, layer.kind, op.name, asked, used, node.op_type, reason)


def _optimized_node(optimized: list[onnx.NodeProto], op: onnx.NodeProto, layer: str) -> onnx.NodeProto | None:
    """The optimized node that computes ``op``: it reads the layer's weights or keeps ``op``'s name."""
    weights = {f"{layer}.weight_quantizer_quantized", op.input[1]}
    by_weight = [n for n in optimized if weights & set(n.input)]
    if len(by_weight) == 1:
        return by_weight[0]
    by_name = [n for n in optimized if _TOKEN_SUFFIX.sub("", n.name) == op.name]
    return by_name[0] if len(by_name) == 1 else None


def _onnxruntime_reason(graph: QdqGraph, op: onnx.NodeProto, layer: LayerInfo) -> str:
    """Why onnxruntime left a layer asked for integer arithmetic in float (from the Q/DQ pattern)."""
    if op.op_type in _CONVS and 4 in (layer.weight_bits, layer.act_bits):
        return "no 4-bit conv kernel: onnxruntime's CPU integer convolutions take 8-bit inputs only"
    if op.op_type not in ("Conv", "Gemm", "MatMul"):
        return f"op without an integer kernel: onnxruntime has no Q/DQ fusion for {op.op_type}"
    source = graph.producer.get(op.input[0])
    if source is None or source.op_type != "DequantizeLinear":
        return "unfused Q/DQ: the input activation has no QuantizeLinear/DequantizeLinear in front"
    users = graph.consumers.get(op.output[0], [])
    quantized_out = len(users) == 1 and users[0].op_type == "QuantizeLinear"
    if op.op_type in ("Gemm", "MatMul") and not quantized_out:
        bias = op.input[2] if len(op.input) > 2 else ""
        if bias and getattr(graph.producer.get(bias), "op_type", None) != "DequantizeLinear":
            return (
                "unfused Q/DQ: float bias and float output; onnxruntime fuses QGemm only with an int32 bias "
                "behind DequantizeLinear or a QuantizeLinear on the output"
            )
    if op.op_type in _CONVS and not quantized_out:
        between = users[0].op_type if len(users) == 1 else f"{len(users)} consumers"
        return (
            f"unfused Q/DQ: {between} between the Conv and its QuantizeLinear; QLinearConv needs Conv -> "
            "QuantizeLinear (with uint8 activations the exporter drops a ReLU the quantizer already clips)"
        )
    if _zero_point_type(graph, source) == TensorProto.INT8:
        return (
            "unfused Q/DQ: onnxruntime did not fuse this signed-int8 group; its CPU kernels fuse uint8 "
            "activations reliably (export with --target onnxruntime)"
        )
    return "unfused Q/DQ: onnxruntime matched no integer kernel to this Q/DQ group"


def precision_map_tensorrt(
    qdq_model: onnx.ModelProto | str | os.PathLike,
    engine_metadata: Mapping[str, Any],
    *,
    layers: Sequence[LayerInfo] | None = None,
) -> PrecisionMap:
    """Per-layer precision of a TensorRT engine from the inspector's ``engine_layers`` (its metadata).

    Without a GPU the builder cannot inspect the engine (``engine_layers`` is ``None``): every layer
    is then ``unknown``, with the precision the Q/DQ graph asks for as the only information.
    """
    engine_layers = engine_metadata.get("engine_layers")

    def row(layer: LayerInfo, op: onnx.NodeProto, asked: str) -> LayerPrecision:
        if engine_layers is None:
            return LayerPrecision.untraced(layer, op, asked, "the engine inspector needs a GPU to load the engine")
        return _tensorrt_row(layer, op, asked, engine_layers)

    return PrecisionMap(str(engine_metadata.get("target", "tensorrt")), _quantized_rows(qdq_model, layers, row))


def _quantized_rows(
    qdq_model: onnx.ModelProto | str | os.PathLike,
    layers: Sequence[LayerInfo] | None,
    row: Callable[[LayerInfo, onnx.NodeProto, str], LayerPrecision],
) -> tuple[LayerPrecision, ...]:
    """One row per layer: float layers as they are, quantized ones by ``row(layer, its ONNX op, asked)``."""
    model = qdq_model if isinstance(qdq_model, onnx.ModelProto) else onnx.load(os.fspath(qdq_model))
    graph = QdqGraph(model)
    rows = []
    for layer in list(layers) if layers is not None else layers_from_graph(model):
        asked = asked_precision(layer.weight_bits, layer.act_bits)
        if layer.weight_bits is None:
            rows.append(LayerPrecision(layer.name, layer.kind, "", asked, "float", "—"))
        else:
            rows.append(row(layer, graph.weight_consumer(layer.name), asked))
    return tuple(rows)


def _tensorrt_row(
    layer: LayerInfo, op: onnx.NodeProto, asked: str, engine_layers: Iterable[Mapping[str, Any]]
) -> LayerPrecision:
    match = _engine_layer(engine_layers, op.name)
    if match is None:
        return LayerPrecision.untraced(
            layer, op, asked, f"no engine layer names {op.name} (fused into a layer that does not list it)"
        )
    used = tensorrt_format_dtype(match.get("inputs") or [])
    kernel = str(match.get("type") or "?")
    reason = None
    if asks_integer_arithmetic(asked) and used in _FLOAT_KINDS:
        reason = (
            "no 4-bit conv kernel: TensorRT runs 4-bit only as weight-only Gemm/MatMul"
            if op.op_type in _CONVS and 4 in (layer.weight_bits, layer.act_bits)
            else f"unfused Q/DQ: TensorRT chose a {used} kernel for engine layer {match.get('name')}"
        )
    return LayerPrecision(layer.name, layer.kind, op.name, asked, used, kernel, reason)


def _engine_layer(engine_layers: Iterable[Mapping[str, Any]], node: str) -> Mapping[str, Any] | None:
    """The engine layer built from ONNX node ``node``: fused layers are named ``a + b + c``."""
    layers = list(engine_layers)
    exact = [e for e in layers if node in (part.strip() for part in str(e.get("name", "")).split(" + "))]
    if exact:
        return exact[0]
    return next((e for e in layers if node in str(e.get("name", ""))), None)


# Runtime-graph layer types that are data movement or bookkeeping, never a layer's computation.
_OPENVINO_PLUMBING = ("Const", "Input", "Output", "Parameter", "Result", "Reorder", "Reshape")


def precision_map_openvino(
    qdq_model: onnx.ModelProto | str | os.PathLike,
    runtime_layers: Sequence[RuntimeLayer],
    *,
    layers: Sequence[LayerInfo] | None = None,
    runtime: str = "openvino-cpu",
) -> PrecisionMap:
    """What OpenVINO really runs each layer in, from the compiled model's runtime graph.

    ``runtime_layers`` is :meth:`OpenVINORunner.runtime_layers` of the compiled Q/DQ model: the
    primitive whose ``originalLayersNames`` include the layer's ONNX op (OpenVINO keeps the op's
    name, or extends it with ``/WithoutBiases`` and the like) computes it, in its ``runtimePrecision``.
    """
    compute = [r for r in runtime_layers if r.layer_type not in _OPENVINO_PLUMBING]

    def row(layer: LayerInfo, op: onnx.NodeProto, asked: str) -> LayerPrecision:
        match = next(
            (r for r in compute if any(n == op.name or n.startswith(op.name + "/") for n in r.original_layers)), None
        )
        if match is None:
            return LayerPrecision.untraced(
                layer, op, asked, f"no primitive of OpenVINO's runtime graph lists {op.name} among its original layers"
            )
        used = OPENVINO_PRECISION_NAMES.get(match.runtime_precision, "unknown")
        reason = None
        if asks_integer_arithmetic(asked) and used in _FLOAT_KINDS:
            reason = (
                f"unfused Q/DQ: OpenVINO's low-precision transformations left {match.name} "
                f"({match.layer_type}) in {match.runtime_precision}; its quantizers did not match an integer pattern"
            )
        return LayerPrecision(
            layer.name, layer.kind, op.name, asked, used, f"{match.layer_type} ({match.primitive})", reason
        )

    return PrecisionMap(runtime, _quantized_rows(qdq_model, layers, row))


def float_fallback_warning(pmap: PrecisionMap, *, max_lines: int = 8) -> str | None:
    """The console warning when layers asked for INT8/INT4 ran in float (``None`` when none did)."""
    fallbacks = pmap.fallbacks()
    if not fallbacks:
        return None
    lines = [f"warning: {len(fallbacks)} layer(s) asked for integer arithmetic ran in float on {pmap.runtime}:"]
    lines += [f"  {layer.layer} ({layer.asked} -> {layer.kernel}): {layer.reason}" for layer in fallbacks[:max_lines]]
    if len(fallbacks) > max_lines:
        lines.append(f"  ... and {len(fallbacks) - max_lines} more (see the precision map in report.md)")
    return "\n".join(lines)


def render_precision_md(pmap: PrecisionMap | Mapping[str, Any]) -> list[str]:
    """The report.md section "Precision map" (from the map or its ``as_dict()``)."""
    data = pmap.as_dict() if isinstance(pmap, PrecisionMap) else pmap
    if "layers" not in data:
        raise BadInputError("not a precision map: no 'layers'")
    fell = data.get("ran_in_float", [])
    lines = [
        f"## Precision map ({data['runtime']})",
        "",
        (
            f"**{len(fell)} layer(s) asked for integer arithmetic ran in float.**"
            if fell
            else "Every layer runs in the precision it asked for."
        ),
        "",
        "| layer | asked | used | kernel | reason |",
        "|---|---|---|---|---|",
    ]
    for row in data["layers"]:
        used = f"**{row['used']}**" if row["layer"] in fell else row["used"]
        lines.append(f"| `{row['layer']}` | {row['asked']} | {used} | {row['kernel']} | {row['reason'] or ''} |")
    return lines + [""]
