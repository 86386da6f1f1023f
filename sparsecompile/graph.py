"""Small helpers for ATen-level FX graphs produced by ``torch.export``.

Weights in these graphs are ``get_attr`` nodes whose target is the dotted
name of the original parameter, buffer or lifted constant
(``layer1.0.conv1.weight``). Helpers here read and replace those tensors in
place so layer names stay stable through every pass.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

aten = torch.ops.aten

CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
# String-padding overloads ("same"/"valid") are recognised so they can be skipped with a reason.
CONV_STRING_PADDING_OPS = {
    getattr(aten.conv1d, "padding", None),
    getattr(aten.conv2d, "padding", None),
    getattr(aten.conv3d, "padding", None),
} - {None}


def get_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    return getattr(owner, attr)


def set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace (or create) the tensor at ``target``, keeping parameter/buffer kind."""
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    value = value.detach()
    current = getattr(owner, attr, None)
    if isinstance(current, torch.nn.Parameter):
        setattr(owner, attr, torch.nn.Parameter(value, requires_grad=False))
    elif attr in owner._buffers or current is None:
        if attr in owner.__dict__:
            delattr(owner, attr)
        owner.register_buffer(attr, value)
    else:
        setattr(owner, attr, value)


def unique_target(gm: torch.nn.Module, wanted: str) -> str:
    """``wanted`` if free, else ``wanted_1``, ``wanted_2`` ..."""
    candidate, index = wanted, 0
    while True:
        try:
            get_tensor(gm, candidate)
        except AttributeError:
            return candidate
        index += 1
        candidate = f"{wanted}_{index}"


def attr_uses(gm: torch.fx.GraphModule, target: str) -> int:
    """How many graph uses read the tensor at ``target`` (over all get_attr nodes)."""
    return sum(len(n.users) for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)


def arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: torch.fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    elif name in node.kwargs or len(node.args) < index:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs
    else:
        node.args = (*node.args, value)


def conv_params(node: torch.fx.Node) -> dict:
    """Normalised arguments of any non-string-padding convolution node."""
    if node.target == aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, output_padding, groups = node.args[:9]
        return dict(input=x, weight=w, bias=b, stride=list(stride), padding=list(padding),
                    dilation=list(dilation), transposed=bool(transposed), groups=int(groups), bias_index=2)
    ndim = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}[node.target]

    def listify(value, default):
        value = default if value is None else value
        return list(value) if isinstance(value, (list, tuple)) else [value] * ndim

    return dict(
        input=node.args[0], weight=arg(node, 1, "weight"), bias=arg(node, 2, "bias"),
        stride=listify(arg(node, 3, "stride"), 1), padding=listify(arg(node, 4, "padding"), 0),
        dilation=listify(arg(node, 5, "dilation"), 1), transposed=False,
        groups=int(arg(node, 6, "groups", 1)), bias_index=2,
    )


def node_shape(node) -> tuple[int, ...] | None:
    """Static shape from shape propagation or export metadata, if known; symbolic dims are -1.

    ``torch.export`` fills both ``tensor_meta`` and ``val`` with ``SymInt`` dims
    for dynamic axes; ``int()`` on those silently returns the example's size,
    so symbolic dims are mapped to -1 explicitly.
    """
    if not isinstance(node, torch.fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = meta.shape if meta is not None and hasattr(meta, "shape") else None
    if shape is None:
        val = node.meta.get("val")
        shape = val.shape if isinstance(val, torch.Tensor) else None
    if shape is None:
        return None
    return tuple(int(d) if isinstance(d, int) else -1 for d in shape)


def is_getitem(node: torch.fx.Node, index: int) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and node.args[1] == index


def layer_name_for(target: str) -> str:
    for suffix in (".weight", "_weight"):
        if target.endswith(suffix) and len(target) > len(suffix):
            return target[: -len(suffix)]
    return target


def add_bias(gm, layer_node: torch.fx.Node, bias_slot: tuple[int, str], weight_target: str,
             value: torch.Tensor) -> str:
    """Give a bias-less layer the bias ``value``; returns the new attribute's target.

    The bias lives next to the weight, on the weight's own owner (a top-level
    weight ``w`` has no submodule ``w`` to hold ``w.bias``).
    """
    owner, _, attr = weight_target.rpartition(".")
    bias_attr = "bias" if attr == "weight" else f"{attr}_bias"
    target = unique_target(gm, f"{owner}.{bias_attr}" if owner else bias_attr)
    set_tensor(gm, target, value)
    with gm.graph.inserting_before(layer_node):
        bias_node = gm.graph.get_attr(target)
    set_arg(layer_node, *bias_slot, bias_node)
    return target
