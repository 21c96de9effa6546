"""Where the quantizers go: conv/linear modules swapped for quantized ones, and one ActQuantizer on
each tensor that an integer op reads.

Quantizers sit on *tensors*, not on consumers: every input of a conv, linear, residual add, pool
or concat is quantized once, and all quantized consumers of that tensor read the same Q/DQ. This is
the placement onnxruntime fuses into QLinearConv/QLinearAdd and TensorRT fuses into INT8 kernels.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx, nn

from dfq_deploy.config import QuantScheme
from dfq_deploy.errors import BadInputError
from dfq_deploy.layer_overrides import MIN_WEIGHT_BLOCK, LayerQuant
from dfq_deploy.models.capture import RESHAPE_FUNCTIONS, is_add
from dfq_deploy.quant.quantizers import QUANT_LAYER_FOR, ActQuantizer

aten = torch.ops.aten

# Ops computed on integers (besides conv/linear and residual add): their inputs and outputs are
# quantized, which is the pattern onnxruntime turns into QLinear* kernels and TensorRT fuses.
POOL_OPS = {
    aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default,
    aten.avg_pool1d.default,
    aten.adaptive_avg_pool1d.default,
    aten.mean.dim,
}
CONCAT_OPS = {aten.cat.default, torch.cat}
# Ops that only move or select values: a quantized input stays on its grid, so their output
# quantizer shares the input's scale (onnxruntime's integer MaxPool requires exactly that).
DATA_MOVEMENT = {
    aten.max_pool2d.default,
    aten.max_pool1d.default,
    aten.max_pool3d.default,
    aten.flatten.using_ints,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    *RESHAPE_FUNCTIONS,
}
# Ops whose output holds the input's values (dropout is the identity in the inference graph).
VALUE_PRESERVING = DATA_MOVEMENT | {aten.dropout.default}
# Activations a conv/add output is quantized after (Q(relu(x)) fuses into the producing kernel).
ACTIVATIONS = {aten.relu.default, aten.hardtanh.default, aten.clamp.default, aten.relu6.default}
# Elementwise ops through which a tensor keeps "being the first conv's output" for the 8-bit policy.
PASS_THROUGH = ACTIVATIONS | DATA_MOVEMENT | {operator.getitem}


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One quantized layer as reported: its module path, kind and bit widths (None = float)."""

    name: str
    kind: str
    weight_bits: int | None
    act_bits: int | None
    weight_block_size: int | None = None  # None: one weight scale per output channel
    note: str | None = None  # why the layer was quantized differently from what the scheme asked


def insert_quantizers(graph: fx.GraphModule, scheme: QuantScheme) -> list[LayerInfo]:
    """Swap conv/linear modules for quantized ones and quantize the tensors around integer ops."""
    modules = dict(graph.named_modules())
    weighted = [n for n in graph.graph.nodes if n.op == "call_module" and type(modules[n.target]) in QUANT_LAYER_FOR]
    first = weighted[0] if weighted else None
    last = weighted[-1] if weighted else None
    plans = {
        node: _layer_quant(scheme, node.target, modules[node.target], is_first=node is first, is_last=node is last)
        for node in weighted
    }
    weight_only = {
        node for node, (quant, _) in plans.items() if quant.weight_bits is not None and quant.act_bits is None
    }
    placer = _QuantizerPlacer(graph, scheme, first, weight_only)
    layers: list[LayerInfo] = []
    for node in list(graph.graph.nodes):
        if node.op == "call_module" and node in weighted:
            module = modules[node.target]
            quant, note = plans[node]
            w_bits, a_bits = quant.weight_bits, quant.act_bits
            layers.append(LayerInfo(node.target, type(module).__name__, w_bits, a_bits, quant.weight_block_size, note))
            if w_bits is None:
                continue
            graph.set_submodule(
                node.target,
                QUANT_LAYER_FOR[type(module)].from_float(module, w_bits, block_size=quant.weight_block_size),
            )
            if a_bits is not None:
                placer.quantize(node.args[0], a_bits)
                out_bits = scheme.first_last_bits if node is first and scheme.first_last_bits else scheme.act_bits
                placer.quantize_output(node, out_bits)
        elif is_add(node):
            for src in node.args[:2]:
                placer.quantize(src, placer.width_for(src, scheme.act_bits))
            placer.quantize_output(node, scheme.act_bits)
        elif node.op == "call_function" and node.target in POOL_OPS:
            placer.quantize(node.args[0], scheme.act_bits)
            placer.quantize_output(node, scheme.act_bits)
        elif node.op == "call_function" and node.target in CONCAT_OPS:
            for src in node.args[0]:
                placer.quantize(src, scheme.act_bits)
            placer.quantize_output(node, scheme.act_bits)
    placer.tie_data_movement()
    if scheme.unsigned_after_relu:
        _use_unsigned_grids_after_relu(graph)
    if scheme.act_form == "uint8_asymmetric":
        _quantize_biases(graph, weighted)
    graph.graph.lint()
    graph.recompile()
    return layers


def _layer_quant(
    scheme: QuantScheme, name: str, module: nn.Module, *, is_first: bool, is_last: bool
) -> tuple[LayerQuant, str | None]:
    """The scheme's setting for one layer with its weight block fitted to the layer's input size."""
    kind = type(module).__name__
    depthwise = is_depthwise(module)
    quant = scheme.layer_quant(name, kind=kind, is_first=is_first, is_last=is_last, depthwise=depthwise)
    if quant.weight_block_size is None:
        return quant, None
    if not isinstance(module, nn.Linear):
        raise BadInputError(
            f"layer {name} ({kind}): weight_block_size applies to Linear layers only",
            hint='limit the override to Linear layers with kind: "Linear"',
        )
    largest = quant.weight_block_size
    block = fit_block_size(largest, module.in_features)
    if block is not None:
        return dataclasses.replace(quant, weight_block_size=block), None
    quant = scheme.layer_quant(name, kind=kind, is_first=is_first, is_last=is_last, depthwise=depthwise, blocked=False)
    return quant, (
        f"kept at W{quant.weight_bits}A{quant.act_bits} with per-channel weights: INT4 block quantization "
        f"needs a block of {MIN_WEIGHT_BLOCK}..{largest} inputs (a power of two) dividing its "
        f"{module.in_features} inputs"
    )


def is_depthwise(module: nn.Module) -> bool:
    """A conv whose every group reads one input channel (MobileNet's and EfficientNet's 3x3/5x5 ones)."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def fit_block_size(largest: int, in_features: int) -> int | None:
    """The largest power of two from :data:`MIN_WEIGHT_BLOCK` to ``largest`` that divides ``in_features``.

    Fitting the block rather than padding the weight keeps the exported Gemm's shape as the model's
    (a padded weight would need a padded activation too); ``None`` when no block fits.
    """
    block = largest
    while block >= MIN_WEIGHT_BLOCK:
        if in_features % block == 0:
            return block
        block //= 2
    return None


def _quantize_biases(graph: fx.GraphModule, weighted: list[fx.Node]) -> None:
    """onnxruntime form: biases become int32 on the input-scale × weight-scale grid, as its
    integer kernels add them. (TensorRT rejects an int32 bias, so its form keeps float biases.)"""
    for node in weighted:
        layer = graph.get_submodule(node.target)
        src = node.args[0]
        if (
            hasattr(layer, "quantize_bias_with")
            and isinstance(src, fx.Node)
            and src.op == "call_module"
            and str(src.target).startswith("act_quant.")
        ):
            layer.quantize_bias_with(graph.get_submodule(src.target))


NON_NEGATIVE = {aten.relu.default, aten.relu6.default}


def _use_unsigned_grids_after_relu(graph: fx.GraphModule) -> None:
    """Give the quantizers that read a ReLU's output the unsigned grid (placement is unchanged)."""
    for node in graph.graph.nodes:
        if node.op == "call_module" and node.target.startswith("act_quant."):
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_function" and src.target in NON_NEGATIVE:
                graph.get_submodule(node.target).unsigned = True


class _QuantizerPlacer:
    """Puts one ActQuantizer on a tensor; every consumer of the tensor then reads its output."""

    def __init__(
        self, graph: fx.GraphModule, scheme: QuantScheme, first: fx.Node | None, weight_only: set[fx.Node] = frozenset()
    ):
        self.graph = graph
        self.scheme = scheme
        self.first = first
        self.weight_only = weight_only
        self.container = nn.Module()
        graph.add_module("act_quant", self.container)
        self.quantizer_of: dict[fx.Node, fx.Node] = {}

    def quantize(self, src: Any, bits: int) -> None:
        if not isinstance(src, fx.Node):
            return
        if src.op == "call_module" and src.target.startswith("act_quant."):
            src = src.args[0]  # already quantized: only the bit width may need raising
        if self.first is not None and self.scheme.first_last_bits and _derives_from(src, self.first):
            bits = max(bits, self.scheme.first_last_bits)
        if src in self.quantizer_of:
            quantizer = self.graph.get_submodule(self.quantizer_of[src].target)
            quantizer.bits = max(quantizer.bits, bits)
            return
        self.container.add_module(src.name, ActQuantizer(bits, self.scheme.act_form))
        with self.graph.graph.inserting_after(src):
            qnode = self.graph.graph.call_module(f"act_quant.{src.name}", (src,))
        src.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        self.quantizer_of[src] = qnode

    def quantize_output(self, node: fx.Node, bits: int) -> None:
        """Quantize ``node``'s output after its activation, unless it is a model output or only
        weight-only layers read it."""
        out = node
        while len(out.users) == 1:
            (user,) = out.users
            if user.op != "call_function" or user.target not in ACTIVATIONS:
                break
            out = user
        if any(user.op == "output" for user in out.users) or self._read_by_weight_only(out):
            return
        self.quantize(out, self.width_for(out, bits))

    def width_for(self, node: Any, bits: int) -> int:
        """``bits``, or the scheme's ``residual_bits`` when only residual adds read ``node``."""
        residual = self.scheme.residual_bits
        if residual is None or not isinstance(node, fx.Node) or not self._read_only_by_adds(node):
            return bits
        return max(bits, residual)

    def _read_only_by_adds(self, node: fx.Node) -> bool:
        users = [user for user in node.users if not (user.op == "call_module" and user.target.startswith("act_quant."))]
        return bool(users) and all(is_add(user) for user in users)

    def _read_by_weight_only(self, node: fx.Node) -> bool:
        """True when every reader of ``node``, seen through data movement, is a weight-only layer.

        Such a tensor stays float: weight-only layers compute in float anyway, and TensorRT needs
        it so (tensorrt_rtx 1.7 fails to build a block-quantized INT4 Gemm whose input comes from an
        INT8 Q/DQ, even through Flatten).
        """
        users = list(node.users)
        return bool(users) and all(
            user in self.weight_only
            or (user.op == "call_function" and user.target in VALUE_PRESERVING and self._read_by_weight_only(user))
            for user in users
        )

    def tie_data_movement(self) -> None:
        for src, qnode in self.quantizer_of.items():
            if src.op == "call_function" and src.target in DATA_MOVEMENT and src.args:
                producer = src.args[0]
                if (
                    isinstance(producer, fx.Node)
                    and producer.op == "call_module"
                    and producer.target.startswith("act_quant.")
                ):
                    follower = self.graph.get_submodule(qnode.target)
                    follower.tie_to(self.graph.get_submodule(producer.target))


def _derives_from(node: fx.Node, producer: fx.Node | None) -> bool:
    """True when ``node`` is ``producer``'s output seen through activations and pooling."""
    while producer is not None and isinstance(node, fx.Node):
        if node is producer:
            return True
        if node.op != "call_function" or node.target not in PASS_THROUGH or not node.args:
            return False
        node = node.args[0]
    return False
