"""Find the GEMM-like layers of a graph and decide which can take a 2:4 mask.

A layer is a node whose weight is a constant tensor consumed as one operand
of a matrix product. For each we record the *reduction axis* of the stored
weight tensor -- the axis the 2:4 groups run along:

* ``conv1d/conv2d/convolution`` weight ``[Cout, Cin, *k]``: axis 1 (input
  channels), grouped at each kernel position -- TensorRT's sparse conv layout.
* ``linear`` weight ``[out, in]``: axis 1.
* ``mm/matmul/addmm`` with the constant as the right operand ``[K, N]``:
  axis 0; as the left operand ``[M, K]``: axis 1. A constant reached through
  ``permute``/``t``/``transpose`` maps back to the stored tensor's axis.

Layers that are not eligible are still listed, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx

from sparsecompile.graph import CONV_OPS, CONV_STRING_PADDING_OPS, attr_uses, conv_params, get_tensor, layer_name_for

aten = torch.ops.aten

_MATMUL_OPS = {aten.mm.default: (0, 1), aten.matmul.default: (0, 1), aten.addmm.default: (1, 2)}
# Views that swap the two axes of a 2-D weight (any of them may sit between a weight and its GEMM).
_SWAP_2D_OPS = {aten.t.default, aten.numpy_T.default, aten.mT.default, aten.adjoint.default}
_SWAP_AXES_OPS = {aten.transpose.int, aten.swapaxes.default, aten.swapdims.default}
_TRANSPOSE_OPS = {aten.permute.default} | _SWAP_2D_OPS | _SWAP_AXES_OPS
# Before decomposition transposed convolutions are their own ops (after it, ``convolution(transposed=True)``).
_CONV_TRANSPOSE_OPS = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}


@dataclass
class GemmLayer:
    name: str
    node_name: str
    op: str
    weight_target: str | None
    weight_shape: tuple[int, ...]
    reduction_axis: int | None
    reason: str | None = None  # why the layer stays dense; None = eligible
    extra: dict = field(default_factory=dict)

    @property
    def reduction_size(self) -> int:
        return self.weight_shape[self.reduction_axis] if self.reduction_axis is not None else 0

    @property
    def numel(self) -> int:
        count = 1
        for d in self.weight_shape:
            count *= d
        return count


def _constant_operand(node) -> tuple[torch.fx.Node, list[int]] | None:
    """(get_attr node, axis map operand-axis -> stored-axis) if ``node`` is a constant view."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":
        return node, None
    if node.op == "call_function" and node.target in _TRANSPOSE_OPS and len(node.users) == 1:
        inner = node.args[0]
        if isinstance(inner, torch.fx.Node) and inner.op == "get_attr":
            if node.target == aten.permute.default:
                return inner, list(node.args[1])
            if node.target in _SWAP_2D_OPS:
                return inner, [1, 0]
            d0, d1 = node.args[1], node.args[2]
            return inner, ("transpose", d0, d1)
    return None


def _stored_axis(axis_map, operand_axis: int, rank: int) -> int:
    operand_axis %= rank
    if axis_map is None:
        return operand_axis
    if isinstance(axis_map, tuple):  # transpose(d0, d1)
        _, d0, d1 = axis_map
        d0, d1 = d0 % rank, d1 % rank
        return d1 if operand_axis == d0 else d0 if operand_axis == d1 else operand_axis
    return axis_map[operand_axis] % rank


def _describe(gm, node: torch.fx.Node) -> GemmLayer | None:
    op = str(node.target).split(".")[-2] if "." in str(node.target) else str(node.target)
    if node.target in CONV_STRING_PADDING_OPS or node.target in _CONV_TRANSPOSE_OPS:
        weight = node.args[1]
        target = weight.target if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" else None
        shape = tuple(get_tensor(gm, target).shape) if target else ()
        reason = ("transposed convolution" if node.target in _CONV_TRANSPOSE_OPS
                  else "convolution with string padding ('same'/'valid')")
        return GemmLayer(layer_name_for(target or node.name), node.name, op, target, shape, 1, reason)
    if node.target in CONV_OPS:
        p = conv_params(node)
        located = _constant_operand(p["weight"])
        if located is None or located[1] is not None:
            return GemmLayer(node.name, node.name, op, None, (), None, "weight is not a constant")
        weight_node = located[0]
        shape = tuple(get_tensor(gm, weight_node.target).shape)
        layer = GemmLayer(layer_name_for(weight_node.target), node.name, op, weight_node.target, shape, 1)
        if p["transposed"]:
            layer.reason = "transposed convolution"
        elif len(shape) > 4:
            layer.reason = "3-D convolution (only 1-D and 2-D convolutions)"
        elif p["groups"] != 1:
            layer.reason = "depthwise convolution" if shape[1] == 1 else f"grouped convolution (groups={p['groups']})"
        layer.extra.update(input_arg=0, groups=p["groups"])
        return layer
    if node.target == aten.linear.default:
        located = _constant_operand(node.args[1])
        if located is None or located[1] is not None:
            return GemmLayer(node.name, node.name, op, None, (), None, "weight is not a constant")
        weight_node = located[0]
        shape = tuple(get_tensor(gm, weight_node.target).shape)
        return GemmLayer(layer_name_for(weight_node.target), node.name, op, weight_node.target, shape, len(shape) - 1,
                         extra={"input_arg": 0})
    if node.target in _MATMUL_OPS:
        left_index, right_index = _MATMUL_OPS[node.target]
        left, right = _constant_operand(node.args[left_index]), _constant_operand(node.args[right_index])
        if left and right:
            return GemmLayer(node.name, node.name, op, None, (), None, "both operands are constants")
        if not (left or right):
            return None  # activation x activation: not a layer
        weight_node, axis_map = right or left
        shape = tuple(get_tensor(gm, weight_node.target).shape)
        if len(shape) != 2:
            return GemmLayer(layer_name_for(weight_node.target), node.name, op, weight_node.target, shape, None,
                             f"{len(shape)}-D constant operand (only 2-D weights)")
        operand_axis = 0 if right else 1  # right operand [K, N]; left operand [M, K]
        axis = _stored_axis(axis_map, operand_axis, 2)
        # input_arg: the activation operand; weight_side: which side of the product the constant is on.
        extra = {"input_arg": left_index if right else right_index, "weight_side": "right" if right else "left"}
        return GemmLayer(layer_name_for(weight_node.target), node.name, op, weight_node.target, shape, axis,
                         extra=extra)
    return None


def find_layers(
    gm: torch.fx.GraphModule,
    *,
    n: int = 2,
    m: int = 4,
    alignment: int = 4,
    min_weights: int = 0,
    exclude: list[str] | None = None,
) -> list[GemmLayer]:
    """All GEMM-like layers in graph order, with ``reason`` set for those that stay dense."""
    patterns = [re.compile(p) for p in (exclude or [])]
    layers: list[GemmLayer] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        layer = _describe(gm, node)
        if layer is None:
            continue
        layers.append(layer)
        if layer.reason:
            continue
        weight = get_tensor(gm, layer.weight_target)
        step = max(m, alignment)
        if not weight.is_floating_point():
            layer.reason = f"weight dtype {weight.dtype} is not floating point"
        elif attr_uses(gm, layer.weight_target) != 1:
            layer.reason = f"weight '{layer.weight_target}' is shared by {attr_uses(gm, layer.weight_target)} uses"
        elif layer.reduction_size % step:
            kind = "Cin" if layer.op.startswith("conv") else "K"
            layer.reason = f"{kind}={layer.reduction_size} is not a multiple of {step}"
        elif layer.numel < min_weights:
            layer.reason = f"only {layer.numel} weights (< --min-weights {min_weights})"
        elif any(p.search(layer.name) for p in patterns):
            layer.reason = "excluded by --exclude"
    names = [layer.name for layer in layers]
    for layer in layers:  # two layers reading one tensor would otherwise share a name
        if names.count(layer.name) > 1:
            layer.name = f"{layer.name}@{layer.node_name}"
    return layers


def unmatched_patterns(layers: list[GemmLayer], exclude: list[str]) -> list[str]:
    return [p for p in exclude if not any(re.search(p, layer.name) for layer in layers)]
