"""Channel groups: which tensors must share one input-channel permutation.

Permuting the input channels of a GEMM layer by ``p`` (``W'[:, i] = W[:, p[i]]``)
leaves the network unchanged if every tensor the layer reads is permuted the
same way (``x'[c] = x[p[c]]``). That in turn needs the output channels of
every layer *producing* the tensor permuted (``W'[i] = W[p[i]]``, bias too),
every channel-wise op on the way permuted with it (BatchNorm statistics,
LayerNorm/PReLU parameters, per-channel constants) and every *other* reader
of those tensors permuted as well. A :class:`ChannelGroup` is one connected
set of such tensors ("members"): one channel space, with each member covering
a range ``[offset, offset + size)`` of it (``cat`` along channels splits a
space into ranges).

Exploration walks the graph in both directions from a layer's input:

* backward to producers: a GEMM layer's output channels (stop there), or
  through channel-preserving ops to their inputs;
* forward to readers: GEMM layers (consumers: their input channels get
  permuted), channel-preserving ops (their outputs join the group), and
  reductions over the channel axis (permutation-invariant: the walk stops).

Ops that keep channels (elementwise, BatchNorm, pooling, softmax over any
axis, LayerNorm over the channel axis alone, views that keep the channel
dim, ``permute``/``transpose``, residual ``add``/``mul`` with broadcasting),
``cat`` (the space splits into segments that each map onto themselves),
depthwise convolutions (pass the permutation through), grouped convolutions
(the permutation stays within each group), and ``flatten`` into a Linear (a
channel becomes a block of features) are modelled. Anything else -- a model
input or output carrying the channels, slicing along channels, a reshape
that mixes channels, an op not listed -- makes the whole group unpermutable,
with the reason recorded. Never a wrong network: the build also checks the
permuted graph's outputs against the unpermuted one.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.fx

from sparsecompile.graph import CONV_OPS, attr_uses, conv_params, get_tensor, node_shape, set_tensor
from sparsecompile.layers import GemmLayer

aten = torch.ops.aten


class Unpermutable(Exception):
    """Raised during exploration; the message is the group's recorded reason."""


def _ops(*names: str) -> set:
    """ATen overloads by ``packet.overload`` name, skipping any this torch lacks."""
    found = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            found.add(op)
    return found


# Same-shape ops that act on every element (or every channel) independently.
UNARY_OPS = _ops(
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid", "leaky_relu",
    "elu", "selu", "celu", "mish", "softplus", "relu6", "clamp", "clamp_min", "clamp_max", "neg", "abs", "exp",
    "log", "sqrt", "rsqrt", "reciprocal", "square", "erf", "sin", "cos", "logit", "threshold",
    "pow.Tensor_Scalar", "mul.Scalar", "add.Scalar", "sub.Scalar", "div.Scalar", "rsub.Scalar",
    "clone", "contiguous", "alias", "detach", "_to_copy", "to.dtype", "to.dtype_layout", "lift_fresh_copy",
    "dropout", "hardtanh_", "silu_", "gelu_", "leaky_relu_",
)
BINARY_OPS = _ops(
    "add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "maximum", "minimum", "where.self", "add_.Tensor",
    "mul_.Tensor", "rsub.Tensor", "pow.Tensor_Tensor", "div.Tensor_mode",
)
# Ops on [N, C, *spatial] that treat channels independently (channel axis must be 1).
SPATIAL_OPS = _ops(
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_bilinear2d", "upsample_nearest2d.vec", "upsample_bilinear2d.vec", "_upsample_nearest_exact2d",
)
# Ops returning a tuple whose element 0 is the channel-carrying output.
TUPLE_SPATIAL_OPS = _ops("max_pool2d_with_indices", "max_pool1d_with_indices", "max_pool3d_with_indices",
                         "adaptive_max_pool2d")
BATCHNORM_OPS = _ops("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
                     "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                     "cudnn_batch_norm", "instance_norm")
LAYERNORM_OPS = _ops("layer_norm", "native_layer_norm")
GROUPNORM_OPS = _ops("group_norm", "native_group_norm")
SOFTMAX_OPS = _ops("softmax.int", "_softmax", "log_softmax.int", "_log_softmax")
# (input, dims, keepdim) reductions; over the channel axis they are permutation-invariant.
REDUCE_OPS = _ops("mean.dim", "sum.dim_IntList", "amax", "amin", "logsumexp")
RESHAPE_OPS = _ops("view", "reshape", "_unsafe_view", "flatten.using_ints", "unflatten.int", "squeeze.dim",
                   "squeeze.dims", "squeeze", "unsqueeze", "expand")
TRANSPOSE_OPS = _ops("permute", "transpose.int", "t", "numpy_T", "swapaxes", "swapdims")
SLICE_OPS = _ops("slice.Tensor")
CAT_OPS = _ops("cat", "concat")
PAD_OPS = _ops("constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
               "replication_pad2d")
PRELU_OPS = _ops("prelu", "_prelu_kernel")
# Ops whose output 0 carries the channels; some return a tuple whose other outputs (indices, saved
# statistics) must be unused.
_NORM_LIKE_OPS = TUPLE_SPATIAL_OPS | BATCHNORM_OPS | LAYERNORM_OPS | GROUPNORM_OPS | PRELU_OPS
_GEMM_OPS = _ops("linear", "mm", "matmul", "addmm")
_TUPLE_OPS = TUPLE_SPATIAL_OPS | BATCHNORM_OPS | LAYERNORM_OPS | GROUPNORM_OPS


@dataclass
class Member:
    """A tensor whose channel axis lies in the group's channel space."""

    node: torch.fx.Node
    axis: int
    offset: int
    size: int


@dataclass
class TensorEdit:
    """A stored tensor to re-index when the group's permutation is applied.

    ``kind``: ``"axis"`` -- ``index_select`` along ``axis`` (each channel is
    ``block`` consecutive entries); ``"grouped_input"`` -- a grouped conv's
    weight ``[Cout, Cin/groups, ...]``, permuted along axis 1 within each group.
    """

    target: str
    axis: int
    offset: int
    size: int
    block: int = 1
    kind: str = "axis"
    groups: int = 1
    role: str = ""  # "producer" / "consumer" / "passthrough" / "parameter", for reports


@dataclass
class Consumer:
    layer: GemmLayer
    offset: int
    size: int
    block: int = 1  # > 1: reads the channels flattened into blocks of features
    scored: bool = True  # counts in the search objective (eligible, plain input layout)


@dataclass
class ChannelGroup:
    id: int
    size: int = 0
    members: list[Member] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    edits: list[TensorEdit] = field(default_factory=list)
    boundaries: set[int] = field(default_factory=set)
    reason: str | None = None  # why the group stays unpermuted; None = permutable

    def segments(self) -> list[tuple[int, int]]:
        """Ranges the permutation must map onto themselves."""
        cuts = sorted({0, self.size} | {b for b in self.boundaries if 0 < b < self.size})
        return list(itertools.pairwise(cuts))


def _target_name(target) -> str:
    return getattr(target, "__name__", str(target))


def _normalize(axis: int, rank: int) -> int:
    return axis % rank if rank else 0


def _prefix_signature(shape: tuple[int, ...], upto: int) -> tuple[int, int]:
    """(number of unknown dims, product of known dims) of ``shape[:upto]``."""
    unknown = sum(1 for d in shape[:upto] if d < 0)
    return unknown, math.prod(d for d in shape[:upto] if d >= 0)


def reshape_axis(in_shape, out_shape, axis: int) -> tuple[int, int] | None:
    """Where channel axis ``axis`` of ``in_shape`` lands in ``out_shape``.

    Returns ``(out_axis, block)``: block 1 when the dim is kept as is, block
    ``S`` when it is merged with trailing dims of total size ``S`` (flatten);
    ``None`` when the reshape mixes the channel dim with leading dims or splits it.
    """
    size = in_shape[axis]
    before = _prefix_signature(in_shape, axis)
    for out_axis in range(len(out_shape)):
        if _prefix_signature(out_shape, out_axis) != before:
            continue
        out_size = out_shape[out_axis]
        if out_size == size:
            return out_axis, 1
        if out_size > 0 and size > 0 and out_size % size == 0:
            trailing = in_shape[axis + 1:]
            block = out_size // size
            # the merged dims must be exactly the ones right after the channel axis
            product = 1
            for d in trailing:
                if d < 0:
                    return None
                product *= d
                if product == block:
                    return out_axis, block
            return None
    return None


class GroupFinder:
    """Explores channel groups of one graph; see the module docstring."""

    def __init__(self, gm: torch.fx.GraphModule, layers: list[GemmLayer], eligible: set[str]):
        self.gm = gm
        self.layers = {layer.node_name: layer for layer in layers}
        self.eligible = eligible  # node names of layers the search should score

    # -- public -----------------------------------------------------------
    def find(self) -> list[ChannelGroup]:
        groups: list[ChannelGroup] = []
        seen: set[torch.fx.Node] = set()  # members of groups explored so far
        claimed: set[str] = set()  # layers already a consumer of some group
        nodes = {node.name: node for node in self.gm.graph.nodes}
        for node_name, layer in self.layers.items():
            if node_name not in self.eligible or node_name in claimed:
                continue
            node = nodes[node_name]
            activation = node.args[layer.extra.get("input_arg", 0)]
            if activation in seen:
                continue
            group = ChannelGroup(id=len(groups))
            self._group, self._members, self._queue = group, {}, deque()
            self._consumers_seen: set[str] = set()
            try:
                seed, axis = self._seed(node, layer, activation)
                self._add(seed, axis, 0)
                while self._queue:
                    member = self._members[self._queue.popleft()]
                    self._backward(member)
                    self._forward(member)
                group.members = list(self._members.values())
                self._finish(group)
            except Unpermutable as why:
                group.reason = str(why)
                group.members = list(self._members.values())
                if node_name not in self._consumers_seen:
                    group.consumers.append(Consumer(layer, 0, 0, scored=False))
            seen.update(self._members)
            seen.add(activation)
            claimed.update(c.layer.node_name for c in group.consumers)
            groups.append(group)
        return groups

    def _seed(self, node, layer: GemmLayer, activation) -> tuple[torch.fx.Node, int]:
        """Where to start: the layer's input, or the tensor before a ``flatten`` that feeds it."""
        axis = _normalize(self._consumer_axis(node, layer, activation), len(self._shape(activation)))
        if activation.op == "call_function" and activation.target in RESHAPE_OPS and activation.args:
            source = activation.args[0]
            if isinstance(source, torch.fx.Node):
                for in_axis in range(len(self._shape(source))):
                    try:
                        out_axis, block = self._view_map(activation, source, in_axis)
                    except Unpermutable:
                        continue
                    if out_axis == axis and block > 1:
                        return source, in_axis
        return activation, axis

    # -- exploration --------------------------------------------------------
    def _add(self, node, axis: int, offset: int) -> None:
        shape = self._shape(node)
        axis = _normalize(axis, len(shape))
        size = shape[axis]
        if size <= 0:
            raise Unpermutable(f"'{node.name}' has a dynamic channel dimension")
        known = self._members.get(node)
        if known is not None:
            if (known.axis, known.offset) != (axis, offset):
                raise Unpermutable(f"'{node.name}' is reached at two different channel positions")
            return
        if node.op == "placeholder":
            raise Unpermutable(f"channels come from model input '{node.name}'")
        if node.op == "get_attr":
            raise Unpermutable(f"channels come from constant '{node.target}' used as an activation")
        self._members[node] = Member(node, axis, offset, size)
        self._queue.append(node)

    def _shape(self, node) -> tuple[int, ...]:
        shape = node_shape(node)
        if shape is None:
            raise Unpermutable(f"no shape known for '{getattr(node, 'name', node)}'")
        return shape

    def _edit(self, tensor_node, axis: int, offset: int, size: int, role: str, **kw) -> None:
        """Re-index a stored tensor (a get_attr node) with the group's permutation."""
        if tensor_node is None or not isinstance(tensor_node, torch.fx.Node):
            return
        if tensor_node.op != "get_attr":
            raise Unpermutable(f"'{tensor_node.name}' is computed, not a stored tensor, and would need permuting")
        if attr_uses(self.gm, tensor_node.target) != 1:
            raise Unpermutable(f"'{tensor_node.target}' is shared by several uses")
        for edit in self._group.edits:
            if edit.target == tensor_node.target and edit.axis == axis:
                return  # the same tensor reached twice on the same axis (e.g. a conv read twice)
        self._group.edits.append(TensorEdit(tensor_node.target, axis, offset, size, role=role, **kw))

    def _consumer_axis(self, node, layer: GemmLayer, activation) -> int:
        """The activation axis a GEMM layer reduces over."""
        rank = len(self._shape(activation))
        if node.target in CONV_OPS:
            return 1
        if layer.extra.get("weight_side") == "left":
            raise Unpermutable(f"'{layer.name}' multiplies its input from the left (W @ x)")
        return rank - 1

    def _backward(self, member: Member) -> None:
        node = member.node
        if node.op != "call_function":
            raise Unpermutable(f"channels come from '{node.name}' ({node.op})")
        target = node.target
        if target is operator.getitem:
            source, index = node.args
            if source.op == "call_function" and source.target in _TUPLE_OPS and index == 0:
                self._through(source, member)
                return
            raise Unpermutable(f"channels come from element {index} of '{source.name}'")
        if node.name in self.layers:
            self._producer(node, self.layers[node.name], member)
            return
        self._through(node, member)

    def _producer(self, node, layer: GemmLayer, member: Member) -> None:
        """``node`` is a GEMM layer whose output channels are the member's channels."""
        group = self._group
        if node.target not in CONV_OPS and node.target not in _GEMM_OPS:
            raise Unpermutable(f"channels come from '{layer.name}' ({layer.reason or layer.op})")
        if layer.weight_target is None:
            raise Unpermutable(f"layer '{layer.name}' has a computed weight ({layer.reason})")
        if node.target in CONV_OPS:
            p = conv_params(node)
            if p["transposed"] or member.axis != 1:
                raise Unpermutable(f"'{layer.name}': transposed convolution or channels not on axis 1")
            groups = p["groups"]
            weight_shape = layer.weight_shape
            if groups > 1 and weight_shape[1] == 1 and weight_shape[0] == groups:
                # depthwise with multiplier 1: output channel c reads only input channel c
                self._edit(p["weight"], 0, member.offset, member.size, "passthrough")
                self._edit(p["bias"], 0, member.offset, member.size, "passthrough")
                self._add(p["input"], 1, member.offset)
                return
            if groups > 1:
                if weight_shape[1] == 1:
                    raise Unpermutable(f"depthwise '{layer.name}' has a channel multiplier > 1")
                width = member.size // groups
                group.boundaries.update(member.offset + k * width for k in range(groups + 1))
            self._edit(p["weight"], 0, member.offset, member.size, "producer")
            self._edit(p["bias"], 0, member.offset, member.size, "producer")
        else:
            if member.axis != len(self._shape(node)) - 1:
                raise Unpermutable(f"'{layer.name}' output channels are not on the last axis")
            if layer.extra.get("weight_side") == "left" or len(layer.weight_shape) != 2:
                raise Unpermutable(f"'{layer.name}' multiplies its input from the left (W @ x)")
            weight_node = self._weight_node(node, layer)
            self._edit(weight_node, 1 - layer.reduction_axis, member.offset, member.size, "producer")
            if node.target == aten.linear.default and len(node.args) > 2:
                self._edit(node.args[2], 0, member.offset, member.size, "producer")
            elif node.target == aten.addmm.default:
                bias = node.args[0]
                if isinstance(bias, torch.fx.Node):
                    bias_shape = self._shape(bias)
                    if bias_shape and bias_shape[-1] == member.size:
                        self._edit(bias, len(bias_shape) - 1, member.offset, member.size, "producer")
        if layer.name not in group.producers:
            group.producers.append(layer.name)

    def _weight_node(self, node, layer: GemmLayer):
        for arg in node.args:
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and arg.target == layer.weight_target:
                return arg
            if isinstance(arg, torch.fx.Node) and arg.op == "call_function":
                inner = arg.args[0] if arg.args else None
                if isinstance(inner, torch.fx.Node) and inner.op == "get_attr" and inner.target == layer.weight_target:
                    return inner
        raise Unpermutable(f"weight of '{layer.name}' not found")

    def _through(self, node, member: Member) -> None:
        """``node`` computes the member from its inputs with a channel-preserving op: add the inputs."""
        target = node.target
        axis, offset, size = member.axis, member.offset, member.size
        args = node.args
        out_rank = len(self._shape(member.node))
        if target in UNARY_OPS:
            self._add(args[0], axis, offset)
        elif target in BINARY_OPS:
            for arg in args[:3] if target == aten.where.self else args[:2]:
                self._broadcast_operand(arg, axis, out_rank, offset, size)
        elif target in BATCHNORM_OPS:
            self._require_axis(node, axis, 1)
            for arg in args[1:5]:
                self._edit(arg, 0, offset, size, "parameter")
            self._add(args[0], axis, offset)
        elif target in LAYERNORM_OPS:
            normalized = list(args[1])
            if len(normalized) != 1 or axis != out_rank - 1:
                raise Unpermutable(f"'{node.name}' normalizes over more than the channel axis")
            for arg in args[2:4]:
                self._edit(arg, 0, offset, size, "parameter")
            self._add(args[0], axis, offset)
        elif target in GROUPNORM_OPS:
            self._require_axis(node, axis, 1)
            num_groups = args[1] if target == aten.group_norm.default else args[6]
            width = size // int(num_groups)
            self._group.boundaries.update(offset + k * width for k in range(int(num_groups) + 1))
            for arg in (args[2:4] if target == aten.group_norm.default else args[1:3]):
                self._edit(arg, 0, offset, size, "parameter")
            self._add(args[0], axis, offset)
        elif target in SPATIAL_OPS or target in TUPLE_SPATIAL_OPS:
            self._require_axis(node, axis, 1)
            self._add(args[0], axis, offset)
        elif target in SOFTMAX_OPS:
            self._add(args[0], axis, offset)  # equivariant along any axis
        elif target in REDUCE_OPS:
            self._add(args[0], self._reduction_input_axis(node, axis), offset)
        elif target in PRELU_OPS:
            self._require_axis(node, axis, 1)
            weight_shape = self._shape(args[1])
            if weight_shape and weight_shape[0] == size:
                self._edit(args[1], 0, offset, size, "parameter")
            self._add(args[0], axis, offset)
        elif target in CAT_OPS:
            inputs = args[0]
            dim = _normalize(args[1] if len(args) > 1 else node.kwargs.get("dim", 0), out_rank)
            if dim != axis:
                for inp in inputs:
                    self._add(inp, axis, offset)
                return
            start = offset
            for inp in inputs:
                width = self._shape(inp)[dim]
                self._group.boundaries.update((start, start + width))
                self._add(inp, axis, start)
                start += width
        elif target in TRANSPOSE_OPS or target in RESHAPE_OPS or target in SLICE_OPS or target in PAD_OPS:
            source = args[0]
            in_axis = self._inverse_axis(node, source, axis)
            self._add(source, in_axis, offset)
        else:
            raise Unpermutable(f"op '{_target_name(target)}' on the channel path is not modelled")

    def _require_axis(self, node, axis: int, wanted: int) -> None:
        if axis != wanted:
            raise Unpermutable(f"'{node.name}' treats axis {axis} specially, not as channels")

    def _broadcast_operand(self, arg, axis: int, out_rank: int, offset: int, size: int) -> None:
        if not isinstance(arg, torch.fx.Node):
            return  # a Python scalar
        shape = self._shape(arg)
        arg_axis = axis - (out_rank - len(shape))
        if arg_axis < 0 or shape[arg_axis] == 1:
            return  # broadcast along the channels: the same value for every channel
        if shape[arg_axis] != size:
            raise Unpermutable(f"'{arg.name}' has {shape[arg_axis]} entries along the channel axis, not {size}")
        if arg.op == "get_attr":
            self._edit(arg, arg_axis, offset, size, "parameter")
        else:
            self._add(arg, arg_axis, offset)

    def _view_map(self, node, source, in_axis: int) -> tuple[int, int] | None:
        """Output axis (and block) of ``node`` for channel axis ``in_axis`` of ``source``; None = channels lost."""
        target = node.target
        in_shape, out_shape = self._shape(source), self._shape(node)
        rank = len(in_shape)
        args = node.args
        if target in TRANSPOSE_OPS:
            if target == aten.permute.default:
                dims = [_normalize(d, rank) for d in args[1]]
                return dims.index(in_axis), 1
            if len(args) >= 3:
                d0, d1 = _normalize(args[1], rank), _normalize(args[2], rank)
            else:
                d0, d1 = 0, 1
            return (d1 if in_axis == d0 else d0 if in_axis == d1 else in_axis), 1
        if target in SLICE_OPS:
            dim = _normalize(args[1] if len(args) > 1 else 0, rank)
            if dim == in_axis and out_shape[dim] != in_shape[dim]:
                raise Unpermutable(f"'{node.name}' slices along the channel axis")
            return in_axis, 1
        if target in PAD_OPS:
            padded = len(args[1]) // 2
            if in_axis >= rank - padded:
                raise Unpermutable(f"'{node.name}' pads along the channel axis")
            return in_axis, 1
        if target == getattr(aten.expand, "default", None):
            shift = len(out_shape) - rank
            if out_shape[in_axis + shift] != in_shape[in_axis]:
                raise Unpermutable(f"'{node.name}' expands the channel axis")
            return in_axis + shift, 1
        mapped = reshape_axis(in_shape, out_shape, in_axis)
        if mapped is None:
            raise Unpermutable(f"'{node.name}' ({_target_name(target)}) reshapes across the channel axis")
        return mapped

    def _inverse_axis(self, node, source, out_axis: int) -> int:
        """The source axis that becomes ``out_axis`` of a view/transpose/slice/pad node."""
        problems = []
        for in_axis in range(len(self._shape(source))):
            try:
                mapped = self._view_map(node, source, in_axis)
            except Unpermutable as why:
                problems.append(str(why))
                continue
            if mapped == (out_axis, 1):
                return in_axis
        if problems:
            raise Unpermutable(problems[0])
        raise Unpermutable(f"'{node.name}' ({_target_name(node.target)}) creates the channel axis from other dims")

    def _forward(self, member: Member) -> None:
        node = member.node
        for user in list(node.users):
            if user.op == "output":
                raise Unpermutable(f"channels reach model output ('{node.name}')")
            if user.op != "call_function":
                raise Unpermutable(f"'{node.name}' is read by '{user.name}' ({user.op})")
            target = user.target
            if user.name in self.layers:
                self._reader_layer(user, self.layers[user.name], member)
            elif target in _NORM_LIKE_OPS:
                if user.args[0] is not node:
                    raise Unpermutable(f"'{node.name}' is a parameter of '{user.name}', not its input")
                items = list(user.users)
                if items and all(item.target is operator.getitem for item in items):  # returns a tuple
                    for item in items:
                        if item.args[1] == 0:
                            self._add(item, member.axis, member.offset)
                        elif item.users:
                            raise Unpermutable(f"output {item.args[1]} of '{user.name}' is used")
                else:
                    self._add(user, member.axis, member.offset)
            elif target in REDUCE_OPS:
                self._reduction(user, member)
            elif target in CAT_OPS:
                inputs = list(user.args[0])
                if inputs.count(node) != 1:
                    raise Unpermutable(f"'{node.name}' appears several times in '{user.name}'")
                rank = len(self._shape(node))
                dim = _normalize(user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0), rank)
                start = member.offset
                if dim == member.axis:
                    start -= sum(self._shape(inp)[dim] for inp in inputs[:inputs.index(node)])
                self._add(user, member.axis, start)
            elif target in TRANSPOSE_OPS or target in RESHAPE_OPS or target in SLICE_OPS or target in PAD_OPS:
                out_axis, block = self._view_map(user, node, member.axis)
                if block == 1:
                    self._add(user, out_axis, member.offset)
                else:
                    self._flattened(user, out_axis, block, member)
            elif target in BINARY_OPS:
                self._add(user, member.axis + len(self._shape(user)) - len(self._shape(node)), member.offset)
            elif target in UNARY_OPS or target in SPATIAL_OPS or target in SOFTMAX_OPS:
                if user.args[0] is not node:
                    raise Unpermutable(f"'{node.name}' is a parameter of '{user.name}', not its input")
                self._add(user, member.axis, member.offset)
            else:
                raise Unpermutable(f"op '{_target_name(target)}' reads the channels ('{user.name}') and is not modelled")

    def _reduction_input_axis(self, node, out_axis: int) -> int:
        """The input axis of a reduction that became output axis ``out_axis`` (not a reduced one)."""
        rank = len(self._shape(node.args[0]))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            raise Unpermutable(f"'{node.name}' reduces every axis")
        dims = {_normalize(d, rank) for d in ([dims] if isinstance(dims, int) else dims)}
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        if keepdim:
            if out_axis in dims:
                raise Unpermutable(f"'{node.name}' reduces the channel axis")
            return out_axis
        kept = [d for d in range(rank) if d not in dims]
        return kept[out_axis]

    def _reduction(self, user, member: Member) -> None:
        args = user.args
        rank = len(self._shape(member.node))
        dims = args[1] if len(args) > 1 else user.kwargs.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            return  # reduces everything: invariant
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [_normalize(d, rank) for d in dims]
        if member.axis in dims:
            return  # reduces over the channels: permutation-invariant, the walk stops
        keepdim = bool(args[2]) if len(args) > 2 else bool(user.kwargs.get("keepdim", False))
        out_axis = member.axis if keepdim else member.axis - sum(1 for d in dims if d < member.axis)
        self._add(user, out_axis, member.offset)

    def _reader_layer(self, user, layer: GemmLayer, member: Member) -> None:
        node = member.node
        if user.target not in CONV_OPS and user.target not in _GEMM_OPS:
            raise Unpermutable(f"channels are read by '{layer.name}' ({layer.reason or layer.op})")
        input_arg = layer.extra.get("input_arg", 0)
        if len(user.args) <= input_arg or user.args[input_arg] is not node:
            raise Unpermutable(f"'{node.name}' is used as the weight of '{layer.name}'")
        if layer.weight_target is None:
            raise Unpermutable(f"layer '{layer.name}' has a computed weight ({layer.reason})")
        if member.axis != self._consumer_axis(user, layer, node):
            raise Unpermutable(f"'{layer.name}' does not reduce over the channel axis of '{node.name}'")
        group = self._group
        if user.target in CONV_OPS:
            p = conv_params(user)
            groups = p["groups"]
            if p["transposed"]:
                raise Unpermutable(f"'{layer.name}' is a transposed convolution")
            if groups > 1 and layer.weight_shape[1] == 1:
                if layer.weight_shape[0] != member.size:
                    raise Unpermutable(f"depthwise '{layer.name}' has a channel multiplier > 1")
                self._add(user, 1, member.offset)  # passthrough; its weight is edited from the output side
                return
            if groups > 1:
                width = member.size // groups
                group.boundaries.update(member.offset + k * width for k in range(groups + 1))
                self._edit(p["weight"], 1, member.offset, member.size, "consumer", kind="grouped_input",
                           groups=groups)
                self._consumer(layer, member.offset, member.size, scored=False)
                return
            self._edit(p["weight"], 1, member.offset, member.size, "consumer")
        else:
            self._edit(self._weight_node(user, layer), layer.reduction_axis, member.offset, member.size, "consumer")
        self._consumer(layer, member.offset, member.size, scored=layer.node_name in self.eligible)

    def _consumer(self, layer: GemmLayer, offset: int, size: int, *, scored: bool, block: int = 1) -> None:
        if layer.node_name in self._consumers_seen:
            return
        self._consumers_seen.add(layer.node_name)
        self._group.consumers.append(Consumer(layer, offset, size, block, scored and block == 1))

    def _flattened(self, view, out_axis: int, block: int, member: Member) -> None:
        """Channels merged with trailing dims into features (``flatten``): readers must be GEMM layers."""
        for user in view.users:
            layer = self.layers.get(user.name)
            if layer is None or layer.weight_target is None:
                raise Unpermutable(f"flattened channels of '{member.node.name}' are read by '{user.name}', "
                                   "not by a layer")
            input_arg = layer.extra.get("input_arg", 0)
            if user.args[input_arg] is not view or self._consumer_axis(user, layer, view) != out_axis:
                raise Unpermutable(f"'{layer.name}' does not reduce over the flattened channels")
            self._edit(self._weight_node(user, layer), layer.reduction_axis, member.offset, member.size,
                       "consumer", block=block)
            self._consumer(layer, member.offset, member.size, scored=False, block=block)

    def _finish(self, group: ChannelGroup) -> None:
        shift = -min(m.offset for m in group.members)
        for item in (*group.members, *group.consumers, *group.edits):
            item.offset += shift
        group.boundaries = {b + shift for b in group.boundaries}
        group.size = max(m.offset + m.size for m in group.members)
        for item in (*group.members, *group.consumers, *group.edits):
            group.boundaries.update((item.offset, item.offset + item.size))


def find_groups(gm: torch.fx.GraphModule, layers: list[GemmLayer], eligible: set[str]) -> list[ChannelGroup]:
    """Channel groups seeded from the inputs of the ``eligible`` layers (by node name), in graph order."""
    return GroupFinder(gm, layers, eligible).find()


def permutation_index(perm: torch.Tensor, edit: TensorEdit, length: int) -> torch.Tensor | list[torch.Tensor]:
    """The index along ``edit.axis`` (``length`` entries) implementing the group permutation ``perm``."""
    local = perm[edit.offset:edit.offset + edit.size] - edit.offset
    if edit.kind == "grouped_input":
        width = edit.size // edit.groups
        return [local[k * width:(k + 1) * width] - k * width for k in range(edit.groups)]
    if edit.block > 1:
        local = (local[:, None] * edit.block + torch.arange(edit.block)[None, :]).reshape(-1)
    if local.numel() != length:
        raise ValueError(f"permutation of {local.numel()} entries for an axis of {length}")
    return local


def apply_edit(tensor: torch.Tensor, perm: torch.Tensor, edit: TensorEdit) -> torch.Tensor:
    """``tensor`` re-indexed for the group permutation ``perm`` (new index i <- old index perm[i])."""
    index = permutation_index(perm, edit, tensor.shape[edit.axis] if edit.kind == "axis" else 0)
    if edit.kind == "grouped_input":
        rows = tensor.shape[0] // edit.groups
        parts = [tensor[k * rows:(k + 1) * rows].index_select(1, idx) for k, idx in enumerate(index)]
        return torch.cat(parts, 0)
    return tensor.index_select(edit.axis, index)


def random_permutation(group: ChannelGroup, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of the group's channels that maps every segment onto itself (for tests)."""
    perm = torch.arange(group.size)
    for start, end in group.segments():
        perm[start:end] = start + torch.randperm(end - start, generator=generator)
    return perm


def apply_permutation(gm: torch.nn.Module, group: ChannelGroup, perm: torch.Tensor) -> None:
    """Re-index every stored tensor of ``group`` for ``perm`` (in place)."""
    for edit in group.edits:
        set_tensor(gm, edit.target, apply_edit(get_tensor(gm, edit.target), perm, edit))
