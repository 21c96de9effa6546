"""Blocks for reconstruction, found on the graph, not by module names: a block ends wherever a single
tensor is all that later nodes need (a residual block ends after its join; a plain chain splits at
every layer, or joins up to ``chain_layers`` of them)."""

from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn

from dfq_deploy.errors import BadInputError
from dfq_deploy.quant.placement import ACTIVATIONS
from dfq_deploy.quant.quantizers import QUANT_LAYER_FOR


@dataclasses.dataclass(frozen=True)
class Block:
    """A run of graph nodes with one tensor in (``input``) and one out (``nodes[-1]``)."""

    name: str
    input: fx.Node
    nodes: tuple[fx.Node, ...]


def find_blocks(graph: fx.GraphModule, *, chain_layers: int = 1) -> list[Block]:
    """Split ``graph`` at single-tensor cuts into blocks that each hold at least one conv/linear.

    Nodes after a block's last layer (its activation, output quantizer, pooling) stay in that block,
    so a block learns the step size of the tensor it hands on; nodes before the first layer (the
    input quantizer) join the first block. In a plain chain (consecutive one-layer blocks) up to
    ``chain_layers`` layers form one block, which also ends after a layer with no activation (the
    linear bottleneck that ends an inverted-residual block without a skip, as BRECQ's blocks do).
    """
    nodes = [n for n in graph.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise BadInputError(f"reconstruction needs a model with one input, this one has {len(placeholders)}")
    modules = dict(graph.named_modules())
    order = {n: i for i, n in enumerate(nodes)}
    order[placeholders[0]] = -1
    last_use = {
        n: max((order.get(u, len(nodes)) for u in n.users), default=order[n]) for n in [placeholders[0], *nodes]
    }
    segments: list[list[fx.Node]] = [[]]
    live: set[fx.Node] = {placeholders[0]}
    for i, node in enumerate(nodes):
        segments[-1].append(node)
        live = {n for n in live if last_use[n] > i}
        if last_use[node] > i:
            live.add(node)
        if live == {node}:
            segments.append([])
    segments = [s for s in segments if s]

    def weighted(segment: list[fx.Node]) -> str | None:
        return next((n.target for n in segment if _is_layer(n, modules)), None)

    groups: list[list[fx.Node]] = []
    names: list[str] = []
    pending: list[fx.Node] = []
    for segment in segments:
        name = weighted(segment)
        if name is None:
            if groups:
                groups[-1].extend(segment)
            else:
                pending.extend(segment)
            continue
        groups.append(pending + segment)
        names.append(name)
        pending = []
    groups, names = _join_chains(groups, names, chain_layers, modules)
    blocks, start = [], placeholders[0]
    for name, group in zip(names, groups, strict=False):
        blocks.append(Block(name, start, tuple(group)))
        start = group[-1]
    return blocks


def _is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` runs a quantized conv/linear (what a block must hold at least one of)."""
    return node.op == "call_module" and isinstance(modules[node.target], tuple(QUANT_LAYER_FOR.values()))


# Nonlinearities after a layer (captured graphs hold out-of-place ATen ops, models.capture): a layer
# followed by none of them hands on a linear output, where a chain block ends. The fused activations
# of quantizer placement and the other element-wise ones.
_aten = torch.ops.aten
NONLINEAR = ACTIVATIONS | {
    _aten.silu.default,
    _aten.gelu.default,
    _aten.sigmoid.default,
    _aten.hardswish.default,
    _aten.hardsigmoid.default,
    _aten.leaky_relu.default,
    _aten.elu.default,
    _aten.tanh.default,
    _aten.mish.default,
    _aten.clamp_min.default,
}


def _has_activation(group: list[fx.Node]) -> bool:
    return any(n.op == "call_function" and n.target in NONLINEAR for n in group)


def _join_chains(
    groups: list[list[fx.Node]], names: list[str], chain_layers: int, modules: dict[str, nn.Module]
) -> tuple[list[list[fx.Node]], list[str]]:
    """Consecutive one-layer groups joined, up to ``chain_layers`` layers, ending after a linear one."""
    joined: list[list[fx.Node]] = []
    joined_names: list[str] = []
    open_chain = 0  # layers in the chain block still taking more, 0 when none is
    for group, name in zip(groups, names, strict=True):
        one_layer = sum(_is_layer(n, modules) for n in group) == 1
        if open_chain and one_layer:
            joined[-1] = joined[-1] + group
            open_chain += 1
        else:
            joined.append(group)
            joined_names.append(name)
            open_chain = 1 if one_layer else 0
        if open_chain >= chain_layers or (open_chain and not _has_activation(group)):
            open_chain = 0
    return joined, joined_names


def block_module(graph: fx.GraphModule, block: Block) -> fx.GraphModule:
    """A GraphModule running just ``block``; it shares (not copies) the model's modules."""
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {block.input: sub.placeholder("x")}

    def arg(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise RuntimeError(f"block {block.name} reads {node.name} from outside the block")
            env[node] = sub.get_attr(node.target)
        return env[node]

    for node in block.nodes:
        env[node] = sub.node_copy(node, arg)
    sub.output(env[block.nodes[-1]])
    return fx.GraphModule(graph, sub)
