"""Per-op gain rules of :mod:`sparsecompile.analysis.certify`: for each op with a bound rule, the gain
(Lipschitz constant) of its output in each activation input, the op sets the rules key on, the ``_RULES``
registry and :func:`modelled_ops`. A rule sees one node through ``_Ctx`` and refuses what it cannot bound
with :class:`NotCertifiable`."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch.fx.node import map_aggregate

from sparsecompile.analysis.certify.bounds import NORM_SAFETY

if TYPE_CHECKING:
    from sparsecompile.analysis.certify.interpreter import _Certifier

aten = torch.ops.aten


class NotCertifiable(Exception):
    """The graph contains something the bound does not model (the message names it)."""


# ----------------------------------------------------------------------------------------------------------
# per-op gains


_GELU_LIP = 1.1291  # max_x Phi(x) + x phi(x) = Phi(sqrt 2) + sqrt 2 phi(sqrt 2) = 1.12890; tanh form: 1.12899
_SILU_LIP = 1.0999  # max_x s(x)(1 + x(1 - s(x))) = 1.09984
_MISH_LIP = 1.0900  # max derivative 1.0886
_SELU_LIP = 1.0507009873554805 * 1.6732632423543772 * (1 + 1e-9)


def _leaky_lip(ctx) -> float:
    return max(1.0, abs(float(ctx.literal(1, "negative_slope", 0.01))))


def _elu_lip(ctx) -> float:
    alpha = abs(float(ctx.literal(1, "alpha", 1.0)))
    scale = abs(float(ctx.literal(2, "scale", 1.0)))
    input_scale = abs(float(ctx.literal(3, "input_scale", 1.0)))
    return scale * max(1.0, alpha * input_scale)


_UNARY: dict = {
    aten.relu.default: 1.0, aten.hardtanh.default: 1.0, aten.relu6.default: 1.0, aten.clamp.default: 1.0,
    aten.clamp.Tensor: 1.0, aten.clamp_min.default: 1.0, aten.clamp_max.default: 1.0, aten.tanh.default: 1.0,
    aten.abs.default: 1.0, aten.neg.default: 1.0, aten.sigmoid.default: 0.25, aten.gelu.default: _GELU_LIP,
    aten.silu.default: _SILU_LIP, aten.mish.default: _MISH_LIP, aten.hardswish.default: 1.5,
    aten.hardsigmoid.default: (1.0 + 1e-6) / 6.0,  # the float32 kernel's slope is 1/6 rounded up
    aten.softplus.default: 1.0, aten.selu.default: _SELU_LIP,
    aten.leaky_relu.default: _leaky_lip, aten.elu.default: _elu_lip,
    aten.clip.default: 1.0, aten.clip.Tensor: 1.0, aten.sin.default: 1.0, aten.cos.default: 1.0,
    aten.atan.default: 1.0, aten.erf.default: 2.0 / math.sqrt(math.pi) * (1 + 1e-9),
}
# In-place forms (exported from ``nn.ReLU(inplace=True)`` and friends): same value, same constant.
for _name in ("relu_", "hardtanh_", "leaky_relu_", "sigmoid_", "tanh_", "silu_", "hardswish_", "hardsigmoid_",
              "elu_", "gelu_", "clamp_", "clamp_min_", "clamp_max_", "clip_"):
    _packet = getattr(aten, _name, None)
    _functional = getattr(aten, _name[:-1], None)
    if _packet is not None and _functional is not None and "default" in _packet.overloads():
        _UNARY[_packet.default] = _UNARY.get(getattr(_functional, "default", None), None)
_UNARY = {k: v for k, v in _UNARY.items() if v is not None}

# Linear maps with nonnegative coefficients (activation = argument 0): gain by the Schur test.
_NONNEG_LINEAR = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.narrow.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default, aten.lift_fresh_copy.default, aten.avg_pool1d.default, aten.avg_pool2d.default,
    aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default, aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default,
    aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default, aten.im2col.default,
    aten.col2im.default, aten.unfold.default, aten.constant_pad_nd.default, aten.pad.default,
    aten.reflection_pad1d.default, aten.reflection_pad2d.default, aten.replication_pad1d.default,
    aten.replication_pad2d.default, aten.upsample_nearest1d.default, aten.upsample_nearest1d.vec,
    aten.upsample_nearest2d.default, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.default,
    aten.upsample_nearest3d.vec, aten._upsample_nearest_exact2d.default, aten._upsample_nearest_exact2d.vec,
    aten.upsample_bilinear2d.default, aten.upsample_bilinear2d.vec, aten.upsample_linear1d.default,
    aten.upsample_linear1d.vec, aten.repeat.default, aten.pixel_shuffle.default, aten.pixel_unshuffle.default,
    aten.channel_shuffle.default, aten.roll.default, aten.flip.default, aten.dropout.default,
    aten._to_copy.default, aten.to.dtype,
}

# Value-preserving ops (no probe needed; ``detach`` would also hide the probe's gradient).
_IDENTITY = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
             aten.lift_fresh_copy.default, aten.dropout.default, aten._to_copy.default, aten.to.dtype}

_MAX_POOL = {aten.max_pool1d.default: False, aten.max_pool2d.default: False, aten.max_pool3d.default: False,
             aten.max_pool1d_with_indices.default: True, aten.max_pool2d_with_indices.default: True,
             aten.max_pool3d_with_indices.default: True}
_ADAPTIVE_MAX_POOL = {aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default,
                      aten.adaptive_max_pool3d.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.unsafe_split.Tensor, aten.chunk.default,
           aten.unbind.int}
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
_CONV_TRANSPOSE = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_MATMUL = {aten.mm.default, aten.matmul.default, aten.bmm.default}
_GEMM_LIKE = _CONV | _CONV_TRANSPOSE | _MATMUL | {aten.linear.default, aten.addmm.default}


def _op_name(target) -> str:
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", None) or str(target)


def _window_multiplicity(n: int, out: int, k: int, s: int, p: int, d: int) -> int:
    """Max over input positions of the number of (output, tap) pairs reading it."""
    counts = [0] * n
    for o in range(out):
        for j in range(k):
            i = o * s - p + j * d
            if 0 <= i < n:
                counts[i] += 1
    return max(counts) if counts else 0


def _adaptive_multiplicity(n: int, out: int) -> int:
    counts = [0] * n
    for o in range(out):
        start, end = (o * n) // out, -(-((o + 1) * n) // out)
        for i in range(start, end):
            counts[i] += 1
    return max(counts) if counts else 0


@dataclass
class _Ctx:
    """What a gain rule sees of one node: its sparse-graph node and values."""

    node: torch.fx.Node
    runner: "_Certifier"
    out_dense: object

    def arg(self, index: int, name: str, default=None):
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def literal(self, index: int, name: str, default=None):
        value = self.arg(index, name, default)
        if isinstance(value, torch.fx.Node):
            raise NotCertifiable(f"node '{self.node.name}': argument '{name}' is computed, not a constant")
        return value

    def is_act(self, value) -> bool:
        """An input-dependent tensor (sizes computed from inputs, e.g. ``sym_size``, count as constants)."""
        return self.runner.is_tensor_activation(value)

    def value(self, value):
        """Cross value: dense activations, sparse parameters, literals as is."""
        return self.runner.cross_value(value)

    def delta(self, node: torch.fx.Node) -> torch.Tensor:
        return self.runner.delta_of(node)

    def fail(self, why: str):
        raise NotCertifiable(f"node '{self.node.name}' ({_op_name(self.node.target)}): {why}")


def _act_args(ctx: _Ctx) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    map_aggregate((ctx.node.args, ctx.node.kwargs), lambda a: found.append(a) if ctx.is_act(a) else None)
    return found


def _require_same_rank(ctx: _Ctx, node: torch.fx.Node):
    value, out = ctx.value(node), ctx.out_dense
    if not isinstance(value, torch.Tensor) or not isinstance(out, torch.Tensor) or value.dim() != out.dim():
        ctx.fail("an activation is broadcast against the batch axis (ranks differ)")
    return value


def _replication(value: torch.Tensor, out: torch.Tensor) -> float:
    return out.numel() / max(1, value.numel())


def _unary_rule(ctx: _Ctx):
    lip = _UNARY[ctx.node.target]
    lip = lip(ctx) if callable(lip) else lip
    x = ctx.arg(0, "self")
    if not ctx.is_act(x):
        ctx.fail("expected the activation as first argument")
    return [(x, lip)]


def _nonneg_linear_rule(ctx: _Ctx):
    node = ctx.node
    acts = _act_args(ctx)
    x = ctx.arg(0, "self")
    if len(acts) != 1 or acts[0] is not x:
        ctx.fail("expected exactly one activation input, the first argument")
    if node.target == aten.dropout.default and ctx.literal(2, "train", False):
        ctx.fail("dropout in training mode")
    x_value = ctx.value(x)
    if node.target in (aten._to_copy.default, aten.to.dtype) and ctx.out_dense.dtype != x_value.dtype:
        ctx.fail(f"dtype conversion {x_value.dtype} -> {ctx.out_dense.dtype} (rounding is not modelled)")
    if node.target in _IDENTITY:
        if tuple(ctx.out_dense.shape) != tuple(x_value.shape):
            ctx.fail("identity op changed the shape")
        return [(x, 1.0)]
    key = ("nonneg", node.name, tuple(x_value.shape))
    cached = ctx.runner.cache.get(key)
    if cached is None:
        cached = _schur_gain(ctx, x_value)
        ctx.runner.cache[key] = cached
    return [(x, cached)]


def _schur_gain(ctx: _Ctx, x_value: torch.Tensor) -> float:
    """sqrt(max(A 1) max(A^T 1)) for the op's linear part A, plus the keeps-samples-apart check."""
    node = ctx.node
    runner = ctx.runner
    dtype = torch.float64 if x_value.is_floating_point() else x_value.dtype

    def apply(z):
        args, kwargs = runner.substitute(node, {node.args[0].name: z})
        return node.target(*args, **kwargs)

    try:
        base = apply(torch.zeros(x_value.shape, dtype=dtype))
    except Exception:  # noqa: BLE001 - some ops refuse float64; use the model's dtype
        dtype = x_value.dtype
        base = apply(torch.zeros(x_value.shape, dtype=dtype))
    ones = torch.ones(x_value.shape, dtype=dtype, requires_grad=True)
    with torch.enable_grad():
        out = apply(ones)
        row_sums = (out - base).detach()
        if out.requires_grad:
            (col_sums,) = torch.autograd.grad(out.sum(), ones)
        else:  # not differentiable here: no safe bound
            ctx.fail("could not measure the operator (no gradient)")
    if bool((row_sums < -1e-9).any()) or bool((col_sums < -1e-9).any()):
        ctx.fail("operator has negative coefficients")
    n = x_value.shape[0] if x_value.dim() else 0
    if out.dim() == 0 or out.shape[0] != n:
        ctx.fail(f"output shape {tuple(out.shape)} does not keep the batch of {n} on axis 0")
    if n > 1:
        tags = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype) + 1
        probe = tags.reshape(n, *([1] * (x_value.dim() - 1))).expand(x_value.shape).contiguous()
        with torch.no_grad():
            mixed = apply(probe) - base
        expected = tags.reshape(n, *([1] * (row_sums.dim() - 1))) * row_sums
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if not torch.allclose(mixed.double(), expected.double(), rtol=1e-5, atol=1e-6 * max(scale, 1.0)):
            ctx.fail("the op mixes samples across the batch axis")
    row = float(row_sums.max()) if row_sums.numel() else 0.0
    col = float(col_sums.max()) if col_sums.numel() else 0.0
    return math.sqrt(max(row, 0.0) * max(col, 0.0)) * (1 + NORM_SAFETY)


def _add_sub_rule(ctx: _Ctx):
    node = ctx.node
    alpha = abs(float(ctx.literal(2, "alpha", 1)))
    gains = []
    first = alpha if node.target == aten.rsub.Scalar else 1.0  # rsub: other - alpha * self
    for index, name, factor in ((0, "self", first), (1, "other", alpha)):
        value = ctx.arg(index, name)
        if ctx.is_act(value):
            tensor = _require_same_rank(ctx, value)
            gains.append((value, factor * math.sqrt(_replication(tensor, ctx.out_dense))))
    if node.target in (aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar):
        gains = gains[:1]
    return gains


def _mul_rule(ctx: _Ctx):
    a, b = ctx.arg(0, "self"), ctx.arg(1, "other")
    act_a, act_b = ctx.is_act(a), ctx.is_act(b)
    out = ctx.out_dense
    if act_a and act_b:
        ta, tb = _require_same_rank(ctx, a), _require_same_rank(ctx, b)
        n = out.shape[0]
        inf_a = ta.detach().double().reshape(n, -1).abs().amax(1) if ta.numel() else torch.zeros(n)
        inf_b = tb.detach().double().reshape(n, -1).abs().amax(1) if tb.numel() else torch.zeros(n)
        ra, rb = math.sqrt(_replication(ta, out)), math.sqrt(_replication(tb, out))
        # ||da b_d|| + ||a_d db|| + ||da db||, with ||da db|| <= ||da||_2 ||db||_inf <= ||da|| delta_b
        return [(a, ra * (inf_b + ctx.delta(b))), (b, rb * inf_a)]
    x, c = (a, b) if act_a else (b, a)
    constant = ctx.value(c)
    magnitude = float(constant.detach().abs().max()) if isinstance(constant, torch.Tensor) else abs(float(constant))
    tensor = _require_same_rank(ctx, x)
    return [(x, magnitude * math.sqrt(_replication(tensor, out)))]


def _div_rule(ctx: _Ctx):
    a, b = ctx.arg(0, "self"), ctx.arg(1, "other")
    if ctx.is_act(b):
        ctx.fail("division by an activation")
    if ctx.node.target not in (aten.div.Tensor, aten.div.Scalar):
        ctx.fail("rounding division")
    constant = ctx.value(b)
    smallest = float(constant.detach().abs().min()) if isinstance(constant, torch.Tensor) else abs(float(constant))
    if smallest == 0.0:
        ctx.fail("division by zero")
    tensor = _require_same_rank(ctx, a)
    return [(a, math.sqrt(_replication(tensor, ctx.out_dense)) / smallest)]


def _softmax_rule(ctx: _Ctx):
    x = ctx.arg(0, "self")
    target = ctx.node.target
    dim = int(ctx.literal(1, "dim"))
    rank = ctx.value(x).dim()
    if dim % rank == 0:
        ctx.fail("softmax over the batch axis")
    if target in (aten._softmax.default, aten.softmax.int):
        return [(x, 0.5)]
    size = ctx.value(x).shape[dim]
    return [(x, 1.0 + math.sqrt(size))]  # log-softmax: ||I - 1 p^T|| <= 1 + sqrt(n) ||p||_2


def _cat_rule(ctx: _Ctx):
    tensors = ctx.arg(0, "tensors")
    dim = int(ctx.literal(1, "dim", 0))
    out = ctx.out_dense
    if dim % out.dim() == 0:
        ctx.fail("concatenation along the batch axis")
    acts = [t for t in tensors if ctx.is_act(t)]
    for t in acts:
        _require_same_rank(ctx, t)
    if not acts:
        return []
    deltas = torch.stack([ctx.delta(t) for t in acts])
    total = deltas.pow(2).sum(0).sqrt()
    # sqrt(sum d_i^2) written as sum g_i d_i with g_i = d_i / total (g_i = 1 where everything is 0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return [(t, torch.where(total > 0, deltas[i] / safe, torch.ones_like(total))) for i, t in enumerate(acts)]


def _max_pool_rule(ctx: _Ctx):
    node = ctx.node
    x = ctx.arg(0, "self")
    x_value = ctx.value(x)
    out = ctx.out_dense[0] if isinstance(ctx.out_dense, (tuple, list)) else ctx.out_dense
    dims = int(str(node.target).split("max_pool")[1][0])  # max_pool{1,2,3}d
    if x_value.dim() != dims + 2:
        ctx.fail("max pooling of an unbatched input")
    kernel = list(ctx.literal(1, "kernel_size"))
    stride = list(ctx.literal(2, "stride", []) or kernel)
    padding = ctx.literal(3, "padding", 0)
    dilation = ctx.literal(4, "dilation", 1)
    expand = lambda v: (list(v) * dims if len(v) == 1 else list(v)) if isinstance(v, (list, tuple)) else [v] * dims  # noqa: E731
    kernel, stride, padding, dilation = expand(kernel), expand(stride), expand(padding), expand(dilation)
    multiplicity = 1
    for i in range(dims):
        n, o = x_value.shape[-dims + i], out.shape[-dims + i]
        multiplicity *= _window_multiplicity(n, o, kernel[i], stride[i], padding[i], dilation[i])
    gain = math.sqrt(multiplicity)
    if _MAX_POOL[node.target]:
        return [[(x, gain)], None]
    return [(x, gain)]


def _adaptive_max_pool_rule(ctx: _Ctx):
    x = ctx.arg(0, "self")
    x_value = ctx.value(x)
    out = ctx.out_dense[0]
    dims = {aten.adaptive_max_pool1d.default: 1, aten.adaptive_max_pool2d.default: 2}.get(ctx.node.target, 3)
    multiplicity = 1
    for i in range(dims):
        multiplicity *= _adaptive_multiplicity(x_value.shape[-dims + i], out.shape[-dims + i])
    return [[(x, math.sqrt(multiplicity))], None]


def _reduce_max_rule(ctx: _Ctx):
    x = ctx.arg(0, "self")
    rank = ctx.value(x).dim()
    target = ctx.node.target
    if target == aten.amax.default:
        dims = ctx.literal(1, "dim", [])
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        if not dims or any(int(d) % rank == 0 for d in dims):
            ctx.fail("reduction over the batch axis")
        return [(x, 1.0)]
    if target == aten.max.dim:
        if int(ctx.literal(1, "dim")) % rank == 0:
            ctx.fail("reduction over the batch axis")
        return [[(x, 1.0)], None]
    if target == aten.max.other or target == aten.maximum.default or target == aten.minimum.default:
        a, b = ctx.arg(0, "self"), ctx.arg(1, "other")
        # |max(a,b) - max(a',b')| <= max(|da|, |db|) <= |da| + |db| elementwise
        gains = []
        for value in (a, b):
            if ctx.is_act(value):
                gains.append((value, math.sqrt(_replication(_require_same_rank(ctx, value), ctx.out_dense))))
        return gains
    ctx.fail("unsupported reduction")


def _split_rule(ctx: _Ctx):
    x = ctx.arg(0, "self")
    rank = ctx.value(x).dim()
    default_dim = 0
    dim = int(ctx.literal(2 if ctx.node.target != aten.unbind.int else 1, "dim", default_dim))
    if dim % rank == 0:
        ctx.fail("split along the batch axis")
    return [[(x, 1.0)] for _ in ctx.out_dense]


def _batch_norm_rule(ctx: _Ctx):
    target = ctx.node.target
    x = ctx.arg(0, "input")
    weight, var = ctx.value(ctx.arg(1, "weight")), ctx.value(ctx.arg(4, "running_var"))
    if target == aten._native_batch_norm_legit_no_training.default:
        eps = float(ctx.literal(6, "eps", 1e-5))
    else:
        if ctx.literal(5, "training", False):
            ctx.fail("batch norm in training mode (mixes samples)")
        eps = float(ctx.literal(7, "eps", 1e-5))
    for node_arg in (ctx.arg(1, "weight"), ctx.arg(2, "bias"), ctx.arg(3, "running_mean"), ctx.arg(4, "running_var")):
        if ctx.is_act(node_arg):
            ctx.fail("batch-norm parameters computed from activations")
    if var is None:
        ctx.fail("batch norm without running statistics")
    scale = 1.0 / torch.sqrt(var.detach().double() + eps)
    if weight is not None:
        scale = scale * weight.detach().double()
    gain = float(scale.abs().max()) * (1 + NORM_SAFETY) if scale.numel() else 0.0
    if target != aten.batch_norm.default:  # the tuple forms: (output, saved mean, saved rstd)
        return [[(x, gain)], None, None]
    return [(x, gain)]


def _layer_norm_rule(ctx: _Ctx):
    target = ctx.node.target
    x = ctx.arg(0, "input")
    shape = list(ctx.literal(1, "normalized_shape"))
    weight = ctx.value(ctx.arg(2, "weight"))
    eps = float(ctx.literal(4, "eps", 1e-5))
    for node_arg in (ctx.arg(2, "weight"), ctx.arg(3, "bias")):
        if ctx.is_act(node_arg):
            ctx.fail("layer-norm parameters computed from activations")
    x_value = ctx.value(x).detach().double()
    n_rows = x_value.shape[0]
    width = math.prod(shape)
    if x_value.dim() - len(shape) < 1:
        ctx.fail("layer norm over the batch axis")
    rows = x_value.reshape(n_rows, -1, width)
    std = rows.var(dim=-1, unbiased=False).sqrt()  # [N, rows]
    delta = ctx.delta(x).reshape(n_rows, 1)
    # std is (1/sqrt(width))-Lipschitz in l2, and a row moves by at most delta
    low = (std - delta / math.sqrt(width)).clamp_min(0.0)
    s_min = torch.sqrt(low ** 2 + eps)
    w_max = float(weight.detach().double().abs().max()) if weight is not None else 1.0
    gain = w_max / s_min.amin(dim=1) * (1 + NORM_SAFETY)
    if target == aten.native_layer_norm.default:
        return [[(x, gain)], None, None]
    return [(x, gain)]


def _gemm_rule(ctx: _Ctx):
    """conv / linear / addmm / mm / matmul with a constant weight; see :func:`gemm_operator`."""
    x, gain, _ = ctx.runner.gemm_operator(ctx)
    return [(x, gain)]


def _getitem_rule(ctx: _Ctx):  # handled by the runner (selects an element of a tuple value)
    return []


_RULES: dict = {}
for _ops, _rule in (
    (_UNARY, _unary_rule),
    (_NONNEG_LINEAR, _nonneg_linear_rule),
    ((aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar), _add_sub_rule),
    ((aten.mul.Tensor, aten.mul.Scalar), _mul_rule),
    ((aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.div.Scalar_mode), _div_rule),
    ((aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int), _softmax_rule),
    (_MAX_POOL, _max_pool_rule),
    (_ADAPTIVE_MAX_POOL, _adaptive_max_pool_rule),
    ((aten.amax.default, aten.max.dim, aten.max.other, aten.maximum.default, aten.minimum.default), _reduce_max_rule),
    (_SPLITS, _split_rule),
    (_GEMM_LIKE, _gemm_rule),
):
    for _op in _ops:
        _RULES[_op] = _rule
_RULES[aten.cat.default] = _cat_rule
_RULES[aten.batch_norm.default] = _batch_norm_rule
_RULES[aten._native_batch_norm_legit_no_training.default] = _batch_norm_rule
_RULES[aten.native_batch_norm.default] = _batch_norm_rule
_RULES[aten._native_batch_norm_legit.default] = _batch_norm_rule
_RULES[aten.layer_norm.default] = _layer_norm_rule
_RULES[aten.native_layer_norm.default] = _layer_norm_rule
_RULES[operator.getitem] = _getitem_rule


def modelled_ops() -> list[str]:
    """Names of the ops with a bound rule (any other tensor op gets the unbounded fallback, named in the report)."""
    return sorted({_op_name(op) for op in _RULES})

