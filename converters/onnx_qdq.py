"""Export float and fake-quantized models to ONNX; quantized ones with QuantizeLinear/DequantizeLinear.

Q/DQ form per target (see DESIGN.md): onnxruntime's CPU target gets uint8 activations with zero
points, TensorRT targets signed symmetric int8; weights are always symmetric per-channel integer
initializers behind DequantizeLinear (axis 0) and biases stay float.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
import onnx
import onnx.version_converter
import onnx_graphsurgeon as gs
import torch
from torch import nn

from dfq_deploy.converters.passes import (
    QuantSpec,
    constants_to_initializers,
    drop_activations_before_quantize,
    drop_custom_opset,
    fold_weight_transposes,
    inline_constant_identities,
    materialize_quantizers,
    name_unnamed_nodes,
)
from dfq_deploy.errors import ExportError
from dfq_deploy.quant.quantize import QuantModel

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INT8_OPSET = 19
INT4_OPSET = 21
# The TorchScript exporter's newest opset (torch 2.14). Asked for more, it warns and stamps the newer
# number on opset-20 symbolics; we trace at 20 and let onnx's version converter do the upgrade.
TRACE_MAX_OPSET = 20


def onnx_from_float_model(
    model: nn.Module, *, input_shape: tuple[int, ...], opset: int = INT8_OPSET
) -> onnx.ModelProto:
    """The float model as ONNX with a dynamic batch dimension (the FP32 baseline)."""
    model_proto = _trace_to_onnx(model, input_shape, opset)
    onnx.checker.check_model(model_proto, full_check=True)
    return model_proto


def onnx_from_quant_model(qmodel: QuantModel, *, opset: int | None = None) -> onnx.ModelProto:
    """The fake-quant model as a Q/DQ ONNX graph that runtimes execute in integer arithmetic."""
    specs: dict[int, QuantSpec] = {}
    needs_int4 = False
    with _export_marks(qmodel, specs):
        needs_int4 = any(s.dtype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) for s in specs.values())
        opset = opset or (INT4_OPSET if needs_int4 else INT8_OPSET)
        if needs_int4 and opset < INT4_OPSET:
            raise ExportError(f"4-bit values need ONNX opset >= {INT4_OPSET}, asked for {opset}")
        traced = _trace_to_onnx(qmodel.module, qmodel.input_shape, opset, custom_opsets={"dfq": 1})
    graph = gs.import_onnx(traced)
    graph = materialize_quantizers(inline_constant_identities(constants_to_initializers(graph)), specs)
    graph = fold_weight_transposes(graph)
    by_q_node = {f"{spec.name}/QuantizeLinear": spec for spec in specs.values() if spec.kind == "activation"}
    graph = name_unnamed_nodes(drop_activations_before_quantize(graph, by_q_node).toposort())
    model_proto = drop_custom_opset(gs.export_onnx(graph))
    model_proto.producer_name = "dfq-deploy"
    try:
        onnx.checker.check_model(model_proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported Q/DQ graph is not valid ONNX: {str(exc).splitlines()[0]}") from exc
    return model_proto


@contextlib.contextmanager
def _export_marks(qmodel: QuantModel, specs: dict[int, QuantSpec]) -> Iterator[None]:
    """Number every quantizer, describe it in ``specs`` and make it trace as a mark."""
    module = qmodel.module
    index = 0
    touched = []
    for name, q in qmodel.act_quantizers():
        if q.mode != "quantize":
            continue
        q.export_index = index
        specs[index] = _activation_spec(name, q)
        touched.append(q)
        index += 1
    for name, layer in module.named_modules():
        wq = getattr(layer, "weight_quantizer", None)
        if wq is None or not wq.enabled:
            continue
        wq.export_index = index
        specs[index] = _weight_spec(
            f"{name}.weight_quantizer", wq, layer.weight, container=qmodel.scheme.export_weight_container()
        )
        touched.append(wq)
        index += 1
    biased = []
    for name, layer in module.named_modules():
        if getattr(layer, "bias_scale", None) is None or layer.bias_scale() is None:
            continue
        layer.bias_export_index = index
        specs[index] = _bias_spec(f"{name}.bias_quantizer", layer)
        biased.append(layer)
        index += 1
    try:
        yield
    finally:
        for q in touched:
            q.export_index = None
        for layer in biased:
            layer.bias_export_index = None


def _activation_spec(name: str, q) -> QuantSpec:
    # Narrower grids are written as 8-bit Q/DQ behind a Clip to the grid's range: Q(clip(x)) lands on
    # exactly the codes the b-bit quantizer gives, and runtimes keep their 8-bit kernels (onnxruntime
    # 1.32 fuses uint4 Q/DQ into QLinearConv and then rejects the graph; TensorRT has no 4-bit
    # activations at all).
    qmin, qmax = q.qrange
    scale, zero_point = float(q.scale.item()), int(q.zero_point.item())
    # The form decides the container: TensorRT's is signed int8 even where simulation used an
    # unsigned grid after a ReLU ([0, 2^b-1] fits in int8 below 8 bits).
    dtype = onnx.TensorProto.INT8 if q.symmetric else onnx.TensorProto.UINT8
    full = (-128, 127) if q.symmetric else (0, 255)
    if not full[0] <= qmin < qmax <= full[1]:
        raise ExportError(
            f"quantizer {name}: its grid [{qmin}, {qmax}] does not fit the runtime's "
            f"{'int8' if q.symmetric else 'uint8'} activations",
            hint="an unsigned 8-bit grid is simulation-only for TensorRT; turn off unsigned_after_relu at 8 bits",
        )
    clip = None if (qmin, qmax) == full else ((qmin - zero_point) * scale, (qmax - zero_point) * scale)
    return QuantSpec(name, "activation", np.float32(scale), np.array(zero_point), dtype, clip=clip)


def _weight_spec(name: str, wq, weight: torch.Tensor, *, container: str = "int8") -> QuantSpec:
    # Per-channel weights of any width <= 8 are exact in an int8 container, which every runtime's
    # integer kernels read. Block-quantized weights are the INT4 weight-only form (TensorRT's
    # Gemm/MatMul): ONNX INT4 blocked along the input axis (1: a Linear's weight is [out, in] and the
    # exporter writes Gemm with transB=1), zero point 0 of the scale's shape.
    values = wq.integer_weight(weight).numpy()
    scale = wq.scale.detach().numpy().astype(np.float32)
    if wq.block_size is not None:
        return QuantSpec(
            name,
            "weight",
            scale,
            np.zeros(scale.shape, dtype=np.int8),
            onnx.TensorProto.INT4,
            axis=1,
            integer_values=values,
            block_size=wq.block_size,
        )
    if container == "uint8":  # the same values offset by 128 (see config.WeightContainer)
        return QuantSpec(
            name,
            "weight",
            scale,
            np.full(values.shape[0], 128, dtype=np.uint8),
            onnx.TensorProto.UINT8,
            axis=0,
            integer_values=(values.astype(np.int16) + 128).astype(np.uint8),
        )
    return QuantSpec(
        name,
        "weight",
        scale,
        np.zeros(values.shape[0], dtype=np.int8),
        onnx.TensorProto.INT8,
        axis=0,
        integer_values=values,
    )


def _bias_spec(name: str, layer) -> QuantSpec:
    values = layer.integer_bias().numpy()
    return QuantSpec(
        name,
        "weight",
        layer.bias_scale().detach().numpy().astype(np.float32),
        np.zeros(values.shape[0], dtype=np.int32),
        onnx.TensorProto.INT32,
        axis=0,
        integer_values=values,
    )


def _trace_to_onnx(
    module: nn.Module, input_shape: tuple[int, ...], opset: int, custom_opsets: dict[str, int] | None = None
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    example = torch.zeros(2, *input_shape)
    module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter: it traces autograd.Function.symbolic marks, which the
            # dynamo exporter does not, and keeps module paths in node names.
            torch.onnx.export(
                module,
                (example,),
                buffer,
                dynamo=False,
                opset_version=min(opset, TRACE_MAX_OPSET),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                custom_opsets=custom_opsets,
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types for unsupported ops
        raise ExportError(
            f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    traced = onnx.load_from_string(buffer.getvalue())
    if opset <= TRACE_MAX_OPSET:
        return traced
    try:
        return onnx.version_converter.convert_version(traced, opset)
    except Exception as exc:  # the converter raises plain RuntimeError/ValueError for ops it cannot adapt
        raise ExportError(
            f"could not convert the traced graph to ONNX opset {opset}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
