"""Capture any loaded model as one kind of graph: an fx GraphModule of ATen ops in which every
convolution, linear layer and batch norm is again a real ``nn.Module`` at its original path.

torch.export gives the same ATen graph for an eager module, a ``.pt2`` file or a converted
TorchScript file; lifting the parameterised ops back into modules lets BN hooks, BN folding and
quantizer insertion work on every source format alike, with the user's layer names.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.export import Dim

from dfq_deploy.errors import BadInputError

aten = torch.ops.aten

# In-place ATen ops rewritten out of place so that a quantizer reading a tensor never sees it
# mutated by a later consumer.
_OUT_OF_PLACE = {
    aten.relu_.default: aten.relu.default,
    aten.add_.Tensor: aten.add.Tensor,
    aten.hardtanh_.default: aten.hardtanh.default,
    aten.mul_.Tensor: aten.mul.Tensor,
    aten.hardswish_.default: aten.hardswish.default,
    aten.silu_.default: aten.silu.default,
    aten.sigmoid_.default: aten.sigmoid.default,
}

# Shape arithmetic through ATen overloads is invisible to the ONNX tracer: ``aten.sym_size`` returns a
# plain int and ``aten.view`` takes one, so a channel shuffle's Reshape would keep the export batch.
# The Tensor methods are traced (Shape -> Gather -> Concat), which keeps the batch dimension dynamic.
_TRACEABLE_SHAPE_OPS = {
    aten.sym_size.int: torch.Tensor.size,
    aten.view.default: torch.Tensor.view,
    aten.reshape.default: torch.Tensor.reshape,
    aten._unsafe_view.default: torch.Tensor.reshape,
    aten.expand.default: torch.Tensor.expand,
}
# What the rewritten graph calls for reshapes (quantization treats them as data movement).
RESHAPE_FUNCTIONS = (torch.Tensor.view, torch.Tensor.reshape)


def export_graph(model: nn.Module, input_shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    """torch.export ``model`` for inputs of ``(batch, *input_shape)`` with a dynamic batch size."""
    example = torch.randn(2, *input_shape)
    if not isinstance(model, fx.GraphModule):  # exported GraphModules refuse .eval(); they are eval already
        model.eval()
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=65536)},))
    except Exception as exc:  # torch.export raises many unrelated types; all mean "cannot trace"
        raise BadInputError(
            f"the model could not be traced for inputs of shape (N, {', '.join(map(str, input_shape))}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="check --input-shape; models with data-dependent control flow are not supported",
        ) from exc


def lift_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """Turn ``aten.conv*/linear/batch_norm`` calls on parameter attributes back into nn modules.

    The new module takes the path of the original parameters (``layer1.0.conv1``), so names in
    reports, overrides and ONNX node names are the user's.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        if node.target in _OUT_OF_PLACE:
            node.target = _OUT_OF_PLACE[node.target]
            continue
        if node.target in _TRACEABLE_SHAPE_OPS:
            node.target = _TRACEABLE_SHAPE_OPS[node.target]
            continue
        lifted = _lift(gm, node)
        if lifted is None:
            continue
        path, module, inputs = lifted
        _install(gm, path, module)
        with graph.inserting_before(node):
            new = graph.call_module(path, tuple(inputs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    _read_sizes_locally(graph)
    graph.eliminate_dead_code()
    _drop_unused_attributes(gm)
    gm.recompile()
    return gm


def _read_sizes_locally(graph: fx.Graph) -> None:
    """Make each size read take its dimension from a tensor its consumer already reads.

    ``x.view(inputs.size(0), -1)`` before a classifier keeps the model's *input* alive to the last
    layer, so no single tensor ever carries the whole state and block reconstruction finds one block
    for the whole body. Where the consumer reads a tensor whose export shape has the same symbolic
    size (the batch dimension, mostly), reading it there is the same value by construction.
    """
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.Tensor.size or len(node.args) != 2:
            continue
        size = node.meta.get("val")
        if not isinstance(size, torch.SymInt):
            continue
        for user in list(node.users):
            local = _same_size_dim(user, node, str(size))
            if local is None:
                continue
            with graph.inserting_before(user):
                read = graph.call_function(torch.Tensor.size, local)
            read.meta["val"] = size
            user.replace_input_with(node, read)


def _same_size_dim(user: fx.Node, size_node: fx.Node, symbol: str) -> tuple[fx.Node, int] | None:
    """(tensor, dim) among ``user``'s other inputs whose export shape has ``symbol`` at ``dim``."""
    for tensor in user.all_input_nodes:
        val = tensor.meta.get("val")
        if tensor is size_node or tensor is size_node.args[0] or not isinstance(val, torch.Tensor):
            continue
        for dim, extent in enumerate(val.shape):
            if isinstance(extent, torch.SymInt) and str(extent) == symbol:
                return tensor, dim
    return None


def capture_graph(model: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """Export and lift ``model``: the single graph form every later stage works on."""
    if isinstance(model, fx.GraphModule) and getattr(model, "_dfq_lifted", False):
        return model
    if isinstance(model, torch.jit.ScriptModule):
        model = _program_from_torchscript(model, input_shape).module()
    if getattr(model, "_dfq_exported", False):
        # Already an exported program (.pt2): re-exporting would re-check its batch-size guards;
        # lifting drops them, and a batch-specialised graph then fails the shape check instead.
        lifted = lift_modules(model)
    else:
        lifted = lift_modules(export_graph(model, input_shape).module())
    # A plain GraphModule: the exported one forbids .eval()/.train() and carries export-only state.
    gm = fx.GraphModule(lifted, lifted.graph, class_name=type(model).__name__)
    gm._dfq_lifted = True
    return gm.eval()


def _program_from_torchscript(module: torch.jit.ScriptModule, input_shape: tuple[int, ...]):
    from torch._export.converter import TS2EPConverter

    try:
        return TS2EPConverter(module, (torch.randn(2, *input_shape),)).convert()
    except Exception as exc:  # the converter raises many types for unsupported TorchScript
        raise BadInputError(
            f"the TorchScript model could not be converted to a graph: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            hint="save the model with torch.export.save (a .pt2 file) or as a state_dict + --arch",
        ) from exc


def _attr_path(node) -> str | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return str(node.target)
    return None


def _owner(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else path


def _lift(gm: fx.GraphModule, node: fx.Node):
    """(owner path, module, inputs) for a conv, linear or batch-norm call on the graph's parameters;
    ``None`` for anything else, or for a form no module reproduces (transposed conv, string padding)."""
    target, args = node.target, node.args
    if target == aten.convolution.default:
        # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        if args[6]:
            return None
        args = (*args[:6], args[8])
        target = aten.conv2d.default
    if target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default):
        return _lift_conv(gm, args)
    if target == aten.linear.default:
        return _lift_linear(gm, args)
    if target == aten.batch_norm.default:
        return _lift_batch_norm(gm, args)
    return None


def _weight_and_bias(gm: fx.GraphModule, args) -> tuple[str, nn.Parameter, str | None] | None:
    """(weight path, weight, bias path or None) of a conv/linear call whose weight and bias are
    parameters; None where either is computed (a module built from them would drop that math)."""
    w_path = _attr_path(args[1])
    if w_path is None:
        return None
    b_path = _attr_path(args[2]) if len(args) > 2 else None
    if len(args) > 2 and args[2] is not None and b_path is None:
        return None
    return w_path, _parameter(gm, w_path), b_path


def _lift_conv(gm: fx.GraphModule, args):
    found = _weight_and_bias(gm, args)
    if found is None:
        return None
    w_path, weight, b_path = found
    dims = weight.ndim - 2
    stride, padding, dilation, groups = _conv_opts(args, dims)
    if isinstance(padding, str):
        return None
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    conv = cls(
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=tuple(stride),
        padding=tuple(padding),
        dilation=tuple(dilation),
        groups=groups,
        bias=b_path is not None,
    )
    conv.weight = weight
    if b_path is not None:
        conv.bias = _parameter(gm, b_path)
    return _owner(w_path), conv, [args[0]]


def _lift_linear(gm: fx.GraphModule, args):
    found = _weight_and_bias(gm, args)
    if found is None:
        return None
    w_path, weight, b_path = found
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=b_path is not None)
    lin.weight = weight
    if b_path is not None:
        lin.bias = _parameter(gm, b_path)
    return _owner(w_path), lin, [args[0]]


def _lift_batch_norm(gm: fx.GraphModule, args):
    x, w, b, mean, var, training, _momentum, eps = args[:8]
    paths = [_attr_path(a) for a in (w, b, mean, var)]
    if training or paths[2] is None or paths[3] is None:
        return None
    running_mean = _tensor(gm, paths[2])
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    rank = len(x.meta["val"].shape) if "val" in x.meta else 4
    bn = cls[rank](running_mean.numel(), eps=float(eps), affine=paths[0] is not None)
    if paths[0] is not None:
        bn.weight = _parameter(gm, paths[0])
        bn.bias = _parameter(gm, paths[1])
    bn.running_mean = running_mean
    bn.running_var = _tensor(gm, paths[3])
    return _owner(paths[2]), bn.eval(), [x]


def _conv_opts(args, dims):
    stride = list(args[3]) if len(args) > 3 else [1] * dims
    padding = args[4] if len(args) > 4 else [0] * dims
    padding = padding if isinstance(padding, str) else list(padding)
    dilation = list(args[5]) if len(args) > 5 else [1] * dims
    groups = int(args[6]) if len(args) > 6 else 1
    return stride, padding, dilation, groups


def _tensor(gm: nn.Module, path: str) -> torch.Tensor:
    owner, _, name = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _parameter(gm: nn.Module, path: str) -> nn.Parameter:
    """The tensor at ``path`` as a Parameter (TorchScript conversion stores weights as constants)."""
    value = _tensor(gm, path)
    return value if isinstance(value, nn.Parameter) else nn.Parameter(value.detach().clone())


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``, keeping whatever children the old holder had (e.g. ``downsample.0``)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    old = getattr(parent, leaf, None)
    if isinstance(old, nn.Module):
        for name, child in old.named_children():
            module.add_module(name, child)
    setattr(parent, leaf, module)


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)


def is_add(node: fx.Node) -> bool:
    """A tensor + tensor addition (the residual joins that need Q/DQ on both inputs)."""
    return (
        node.op == "call_function"
        and node.target in (aten.add.Tensor, operator.add, torch.add)
        and len(node.args) >= 2
        and all(isinstance(a, fx.Node) for a in node.args[:2])
    )
