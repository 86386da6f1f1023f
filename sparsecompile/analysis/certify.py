"""Per-sample certificates: how far can masking move a model's outputs?

Given the dense graph ``f_d`` and the sparse graph ``f_s`` (same structure;
masked weights, and any other parameter allowed to differ: rescaled rows,
shifted biases, re-estimated BatchNorm statistics, a bias added where there
was none) and calibration inputs, :func:`certify` computes for every sample
``x`` a number ``delta(x)`` with the guarantee

    ||f_s(x) - f_d(x)||_2 <= delta(x)        (exact arithmetic; see "Limits")

and from it which samples provably keep their predicted class.

How ``delta`` is propagated
---------------------------
Node by node in topological order we keep, per sample, a bound ``delta(v)``
on ``||v_s - v_d||_2`` where ``v_d`` is the node's value in the dense model
and ``v_s`` in the sparse model (the per-sample norm is over everything but
axis 0, which must be the batch axis on every activation). For a node
``v = g(a_1..a_k; theta)`` with activation inputs ``a_i`` and parameters
``theta`` (``theta_s`` in the sparse graph, ``theta_d`` in the dense one):

    v_s - v_d = [g(a_s; theta_s) - g(a_d; theta_s)]  +  [g(a_d; theta_s) - g(a_d; theta_d)]
                 propagation: <= sum_i G_i * delta(a_i)   local term: computed EXACTLY

The local term is evaluated per sample by running the sparse node on the
dense inputs, so it covers every parameter difference at once (the masked
entries, a row rescale, a bias shift: ``||(W_s - W_d) x_d + (b_s - b_d)||``),
and is zero where the node's parameters are unchanged. The gains ``G_i`` are
Lipschitz constants of ``g(.; theta_s)`` in each activation input:

* conv / linear / addmm / mm / matmul with a constant weight: the operator
  norm of the linear map on the whole per-sample input tensor.
  Linear: ``||W||_2`` (SVD in float64). Convolution: a GUARANTEED upper bound
  (:func:`conv_operator_norm_bound`): the zero-padded convolution is a
  restriction of a circular convolution on the padded grid (no wrap-around),
  a stride is removed exactly by the polyphase (space-to-depth) rewrite, and
  a circular convolution's norm is ``max_w ||K^(w)||_2`` over the DFT grid
  (one small SVD per frequency). Power iteration (:func:`power_iteration_norm`)
  only gives a lower estimate; it is reported next to the bound to show how
  tight the bound is, never used in it.
* elementwise activations: their Lipschitz constant (ReLU, leaky ReLU with
  slope <= 1, hardtanh, clamp, tanh, abs: 1; sigmoid 1/4; GELU 1.1291 (the
  max of ``Phi(x) + x phi(x)``, at ``x = sqrt 2``); SiLU 1.0999; hardswish 1.5;
  ...; see ``_UNARY``).
* ``add``/``sub``: ``delta_a + |alpha| delta_b``; an operand broadcast ``r``
  times counts ``sqrt(r)`` times. ``mul``/``div`` by a constant ``c``:
  ``max|c|``, ``max|1/c|``. ``mul`` of two activations:
  ``a_s b_s - a_d b_d = da b_d + a_d db + da db``, so
  ``delta <= ||b_d||_inf delta_a + ||a_d||_inf delta_b + delta_a delta_b``
  (per-sample max norms of the dense values; broadcasting as above).
* averaging, summing, copying and selecting ops (avg/adaptive-avg pooling,
  mean, sum, views, reshape, permute, slice, pad, im2col, nearest/bilinear
  upsampling, ...) are linear with nonnegative coefficients ``A``; their
  gain is ``sqrt(||A||_1 ||A||_inf)`` (Schur test), a guaranteed bound that is
  exact for views (1), for a mean over ``H*W`` positions
  (``1/sqrt(HW)``) and for non-overlapping average pooling (``1/k`` for a
  ``k x k`` window). ``A 1`` and ``A^T 1`` are measured by running the op on
  ones (and one autograd pass), so nothing is derived by hand per op. The
  same probe checks the op keeps samples apart (block diagonal in the batch).
* max pooling: ``|max a - max b| <= max |a - b|`` per window, so the gain is
  ``sqrt(max number of windows an input element belongs to)``, computed from
  kernel, stride, padding, dilation and the actual output size.
* eval-mode BatchNorm: ``max |gamma / sqrt(var + eps)|``; LayerNorm: the
  local bound ``max|gamma| / s_min`` with ``s_min`` the smallest
  ``sqrt(var + eps)`` of a row anywhere within ``delta`` of the dense row.
* softmax: 1/2 (Gershgorin on ``diag(p) - p p^T``); log-softmax:
  ``1 + sqrt(n)``.
* ``cat``: ``sqrt(sum delta_i^2)``.
* shape arithmetic (``sym_size`` and friends) carries no perturbation; the
  two models must agree on it.
* any other op has no bound rule and gets a sound fallback: its output
  delta is exactly 0 on a batch where none of its inputs can differ between
  the models (same op, same inputs), otherwise infinite for every sample of
  the batch (nothing is known of its Lipschitz constant, nor whether it
  mixes samples). The report names each such node and op under
  ``summary.unmodelled_ops`` and counts ``unbounded_samples``; an infinite
  bound certifies nothing. Only what cannot be expressed per sample at all
  (an op that mixes samples where that is detected, an output without the
  batch on axis 0, graphs that differ in structure) makes the result "not
  certifiable", with the node and op named; an error while running a node
  is reported the same way, never raised. A wrong bound is never returned.

Certificate
-----------
For a 2-D output ``[N, C]`` (logits or probabilities) with dense margin
``m = z_top1 - z_top2``: if ``m > sqrt(2) * delta`` the predicted class
cannot change. Proof: for the class ``i`` to be overtaken by ``j`` one needs
``(z_i - z_j) + (dz_i - dz_j) <= 0`` so ``m <= z_i - z_j <= dz_j - dz_i <=
sqrt(2) ||dz||_2 <= sqrt(2) delta``. (The MP paper's Corollary 5.2 states
``m > 2 delta`` with ``delta`` bounding the max-norm of ``dz``; ``sqrt(2)``
with an l2 bound is the tighter sound version here; since
``||dz||_inf <= ||dz||_2``, ``2 * delta`` would also be sound, only looser.)

Elementwise boxes and class-margin back-substitution
----------------------------------------------------
Two tighter bounds run in the same forward pass, and a sample is certified
when any of the three certifies it:

* :mod:`sparsecompile.analysis.taylor` keeps per sample and ELEMENT a box
  ``c +- r`` around each node's difference; linear ops move the centre
  exactly (``J c``) and the radius by ``|J| r``; each nonlinearity is relaxed
  by lines around the sample's dense pre-activation (chord or tangent,
  offsets at the exact extremes), whose offset moves the centre and whose
  width alone widens the radius. Since every local term is an exact vector,
  the boxes stay points wherever every op on the way has such a rule: the
  box then IS the sparse-minus-dense difference recomputed in float64 from
  the dense activations, up to rounding allowances.
* :mod:`sparsecompile.analysis.crown` bounds each class margin's change
  ``dz_top - dz_j`` by back-substitution from the output (VJPs through the
  real sparse layers, CROWN relaxations on the boxes as intermediate bounds),
  so that signs cancel where the boxes are wide (ops without a tight rule,
  e.g. layer norm, whose box is l2-based). A classifier whose output is a
  softmax is bounded on its logits (same top-1 class).

The in-place forms of ops (``relu_`` ...) run on copies here, so every rule
relaxes around the op's real input.

Risky layers
------------
All gains enter linearly, so ``delta(output) = sum over changed nodes k of
c_k`` where ``c_k`` is node ``k``'s local term carried through the gains of
every path downstream (tracked as one column per changed node; gains that
depend on ``delta`` -- products, LayerNorm -- are evaluated with the total
``delta``, which keeps the sum an upper bound). ``c_k`` is the part of the
final bound caused by layer ``k``; ``c_k / local_k`` is its downstream gain
(the graph version of ``L^(d-j) prod_{i>j} ||W_i||``). Layers are ranked by
their share of the bound. The margin back-substitution gives a second,
much tighter attribution (``margin_ranking``, ``margin_used`` per layer): per
sample, for the class pair closest to flipping, each changed layer's local
term carried linearly (through the relaxed downstream network) to that
margin; the rest is what the nonlinear ops add.

Limits (honest)
---------------
* The global l2 chain is loose, typically by one to several orders of
  magnitude on deep networks: operator norms multiply along the depth while
  real errors do not align with every layer's top singular direction.
* The elementwise boxes are nearly exact on the calibration samples (see
  above): a certified sample is one whose sparse prediction provably equals
  the dense one in exact arithmetic, with a float32 allowance, which is
  little more than running the sparse model shows. What they add is the
  rounding-aware guarantee and the per-layer margin attribution; the bound
  is only stated for the samples it was computed on (certifying a
  neighbourhood of inputs would make the boxes wide and the back-substitution
  and intermediate bounds matter, and is not done).
* Exact arithmetic: the two models run in floating point. Norms are
  computed in float64 and operator norms get a relative margin of 1e-6, and
  the margin test keeps a slack of ``1e-5 (1 + ||z_d||_inf)`` for float32
  rounding differences between the two executions; this is not interval
  arithmetic.
* The batch axis must be axis 0 of every activation and no op may mix
  samples; the model must be the same graph in both versions (as a build
  produces them: ``dense_gm`` is a copy taken before masking).
* A graph exported with a static batch (its ops may hold the size, e.g.
  ``view(x, [8, 1280])``) is run on batches of exactly that size
  (:func:`static_batch_size`), the last one padded with copies of its last
  sample, whose results are dropped.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.fx
from torch.fx.node import map_aggregate

from sparsecompile.analysis.crown import CrownModel, certified_margins, crown_certificate
from sparsecompile.analysis.taylor import TaylorModel, output_certificate
from sparsecompile.graph import conv_params, get_tensor
from sparsecompile.verify import flat_outputs

aten = torch.ops.aten

SQRT2 = math.sqrt(2.0)
# Relative margin on computed norms (float64 SVD/FFT rounding is ~1e-13; this is generous).
NORM_SAFETY = 1e-6
# Margin test slack for float32 rounding between the two executions: 1e-5 * (1 + ||z_d||_inf).
FP_SLACK = 1e-5
# A bound that an observed change exceeds by more than this is reported as a violation (a bug).
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-5
# Convolutions whose symbol (frequencies x Cout x Cin*stride^2 entries) exceeds this use the looser bound
# ||W_gemm|| * sqrt(taps per input element); below it the exact-symbol bound is computed in chunks.
MAX_FFT_ELEMENTS = 1 << 31


class NotCertifiable(Exception):
    """The graph contains something the bound does not model (the message names it)."""


# The gain an op without a bound rule gets (see ``_Certifier._unbounded``).
_UNBOUNDED = object()


# ----------------------------------------------------------------------------------------------------------
# operator norms


def _spectral_norms(m: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each matrix in a batch: sqrt of the top eigenvalue of the smaller Gram matrix.

    ``eigvalsh`` of the Hermitian Gram matrix is several times faster than an
    SVD and its top eigenvalue is accurate to ~1e-15 relative in float64.
    """
    gram = m @ m.mH if m.shape[-2] <= m.shape[-1] else m.mH @ m
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()


def matrix_norm_bound(matrix: torch.Tensor) -> float:
    """Spectral norm of a (batch of) matrices, max over the batch, in float64, plus NORM_SAFETY."""
    m = matrix.detach().to(torch.complex128 if matrix.is_complex() else torch.float64)
    if m.numel() == 0:
        return 0.0
    return float(_spectral_norms(m).max()) * (1 + NORM_SAFETY)


def _per_dim_plan(n: int, k: int, s: int, p: int, d: int) -> tuple[int, list[tuple[int, int]]]:
    """Polyphase layout of one spatial dim: grid size M and (phase r, offset q) of every tap."""
    padded = n + 2 * p
    grid = -(-padded // s)
    return grid, [((j * d) % s, (j * d) // s) for j in range(k)]


def conv_operator_norm_bound(weight: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups: int = 1,
                             max_elements: int = MAX_FFT_ELEMENTS) -> float:
    """Guaranteed upper bound on the operator norm of ``conv(x, weight)`` on inputs of spatial ``input_size``.

    ``y[o] = sum_j W[j] xpad[o s + j d]``. Writing ``j d = q s + r`` and
    ``x_r[u] = xpad[u s + r]`` turns it into a stride-1 correlation
    ``y[o] = sum_j W[j] x_{r_j}[o + q_j]`` over ``Cin * s^D`` phase channels;
    the map ``x -> (x_r)`` only pads and reorders, so it is an isometric
    embedding. On the phase grid of size ``M = ceil((n + 2p) / s)`` the taps
    needed by any output never wrap, so the operator is a restriction of the
    circular correlation on that grid, whose norm is
    ``max_w ||sum_t K[t] e^{i w t}||_2`` over the DFT frequencies ``w`` (it is
    block-diagonalised by the DFT). The symbol is evaluated directly from the
    ``kh*kw`` taps, a chunk of frequencies at a time, so memory stays small.
    Grouped convolutions are block diagonal: the max over groups. When the
    symbol would be too large to evaluate the bound
    ``||W_gemm||_2 * sqrt(max taps per input element)`` is used instead
    (im2col is a 0/1 matrix with that many ones per column at most).
    """
    w = weight.detach().double()
    dims = w.dim() - 2
    spatial = list(input_size)[-dims:] if dims else []
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * dims  # noqa: E731
    stride, padding, dilation = as_list(stride), as_list(padding), as_list(dilation)
    if len(stride) == 1 and dims > 1:
        stride = stride * dims
    if len(padding) == 1 and dims > 1:
        padding = padding * dims
    if len(dilation) == 1 and dims > 1:
        dilation = dilation * dims
    cout, cin_g = w.shape[:2]
    kernel = list(w.shape[2:])
    out_g = cout // groups
    blocks = w.reshape(groups, out_g, cin_g, *kernel)
    if all(k == 1 for k in kernel):
        # 1x1 (any stride/padding): per position the same matrix on a subset of positions.
        return matrix_norm_bound(blocks.reshape(groups, out_g, cin_g))
    plans = [_per_dim_plan(n, k, s, p, d) for n, k, s, p, d in zip(spatial, kernel, stride, padding, dilation)]
    grids = [g for g, _ in plans]
    phases = math.prod(stride)
    frequencies = math.prod(grids)
    columns = cin_g * phases
    if groups * frequencies * out_g * columns > max_elements:
        taps_per_element = 1
        for (_, taps), s in zip(plans, stride):
            counts = [0] * s
            for r, _ in taps:
                counts[r] += 1
            taps_per_element *= max(counts)
        return matrix_norm_bound(blocks.reshape(groups, out_g, -1)) * math.sqrt(taps_per_element)
    # One [out_g, Cin_g * phases] matrix per kernel tap (nonzero only in the tap's phase block) and its
    # offset q on the phase grid; the symbol at frequency w is sum_j T_j exp(-2 pi i <w, q_j / M>).
    tap_matrices, offsets = [], []
    for index in itertools.product(*[range(k) for k in kernel]):
        phase = 0
        for i, j in enumerate(index):
            phase = phase * stride[i] + plans[i][1][j][0]
        matrix = torch.zeros(groups, out_g, cin_g, phases, dtype=torch.float64)
        matrix[..., phase] = blocks[(slice(None), slice(None), slice(None), *index)]
        tap_matrices.append(matrix.reshape(groups, out_g, columns))
        offsets.append([plans[i][1][j][1] for i, j in enumerate(index)])
    taps = torch.stack(tap_matrices, dim=1).to(torch.complex128)  # [groups, J, out_g, columns]
    offsets_t = torch.tensor(offsets, dtype=torch.float64)  # [J, dims]
    grid_axes = [torch.arange(g, dtype=torch.float64) / g for g in grids]
    all_freqs = torch.cartesian_prod(*grid_axes).reshape(-1, len(grids))  # [F, dims]
    best = 0.0
    chunk = max(1, (1 << 22) // max(1, groups * out_g * columns))
    for start in range(0, frequencies, chunk):
        angle = -2 * math.pi * (all_freqs[start:start + chunk] @ offsets_t.T)  # [f, J]
        factors = torch.polar(torch.ones_like(angle), angle)
        symbol = torch.einsum("fj,gjab->gfab", factors, taps)
        best = max(best, float(_spectral_norms(symbol).max()))
    return best * (1 + NORM_SAFETY)


def power_iteration_norm(forward: Callable[[torch.Tensor], torch.Tensor], input_shape, iterations: int = 30,
                         seed: int = 0, dtype=torch.float64) -> float:
    """Power-iteration estimate of the operator norm of a linear map (a LOWER estimate, never an upper bound).

    The adjoint is applied through autograd (vector-Jacobian product), so any
    linear ``forward`` works (conv, linear, pooling).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(input_shape), generator=generator, dtype=dtype)
    x = x / x.norm().clamp_min(1e-300)
    estimate = 0.0
    for _ in range(max(1, iterations)):
        with torch.enable_grad():
            x_var = x.detach().requires_grad_(True)
            y = forward(x_var)
            (grad,) = torch.autograd.grad(y, x_var, grad_outputs=y.detach())
        norm = float(grad.norm())  # ||A^T A x|| with ||x|| = 1
        if norm == 0.0:
            return 0.0
        estimate = math.sqrt(norm)
        x = grad / norm
    with torch.no_grad():
        return max(estimate, float(forward(x).norm()))


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
for _op in _UNARY:
    _RULES[_op] = _unary_rule
for _op in _NONNEG_LINEAR:
    _RULES[_op] = _nonneg_linear_rule
for _op in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar):
    _RULES[_op] = _add_sub_rule
for _op in (aten.mul.Tensor, aten.mul.Scalar):
    _RULES[_op] = _mul_rule
for _op in (aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.div.Scalar_mode):
    _RULES[_op] = _div_rule
for _op in (aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int):
    _RULES[_op] = _softmax_rule
for _op in _MAX_POOL:
    _RULES[_op] = _max_pool_rule
for _op in _ADAPTIVE_MAX_POOL:
    _RULES[_op] = _adaptive_max_pool_rule
for _op in (aten.amax.default, aten.max.dim, aten.max.other, aten.maximum.default, aten.minimum.default):
    _RULES[_op] = _reduce_max_rule
for _op in _SPLITS:
    _RULES[_op] = _split_rule
for _op in _GEMM_LIKE:
    _RULES[_op] = _gemm_rule
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


# ----------------------------------------------------------------------------------------------------------
# the runner


def _mutates(target) -> bool:
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _fresh(values):
    """Copies of the tensors in (nested) ``values``, for an op that writes into its inputs."""
    return map_aggregate(values, lambda v: v.clone() if isinstance(v, torch.Tensor) else v)


def _per_sample_norm(value: torch.Tensor, n: int) -> torch.Tensor:
    """l2 norm of each sample (axis 0), accumulated in float64."""
    if value.numel() == 0:
        return torch.zeros(n, dtype=torch.float64)
    flat = value.detach().reshape(n, -1)
    if not flat.is_floating_point():
        flat = flat.double()
    return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)


def _diff_norm(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample ||a - b||; the difference is taken in the values' own dtype (exact when they are close)."""
    if a.dtype != b.dtype or not a.is_floating_point():
        return _per_sample_norm(a.double() - b.double(), n)
    return _per_sample_norm(a - b, n)


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def _ancestors(graph: torch.fx.Graph) -> set[str]:
    output = next(n for n in graph.nodes if n.op == "output")
    seen, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.all_input_nodes)
    return seen


def _classify(gm: torch.fx.GraphModule, needed: set[str]) -> tuple[set[str], set[str]]:
    """(activation node names, parameter node names) among ``needed``: an activation depends on an input."""
    activations, params = set(), set()
    for node in gm.graph.nodes:
        if node.name not in needed or node.op == "output":
            continue
        if node.op == "placeholder" or any(a.name in activations for a in node.all_input_nodes):
            activations.add(node.name)
        else:
            params.add(node.name)
    return activations, params


def _evaluate_params(gm: torch.fx.GraphModule, names: set[str]) -> dict[str, object]:
    values: dict[str, object] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.name not in names:
                continue
            if node.op == "get_attr":
                values[node.name] = get_tensor(gm, node.target)
            elif node.op == "call_function":
                args, kwargs = map_aggregate((node.args, node.kwargs),
                                             lambda a: values[a.name] if isinstance(a, torch.fx.Node) else a)
                values[node.name] = node.target(*args, **kwargs)
            else:
                raise NotCertifiable(f"node '{node.name}': {node.op} nodes are not modelled")
    return values


@dataclass
class _LayerStats:
    node: str
    op: str
    local: list[torch.Tensor] = field(default_factory=list)
    weight_term: list[torch.Tensor] = field(default_factory=list)
    bias_term: list[torch.Tensor] = field(default_factory=list)
    gain: float | None = None


class _Certifier:
    def __init__(self, dense_gm, sparse_gm, iterations: int):
        self.dense_gm, self.sparse_gm = dense_gm, sparse_gm
        self.iterations = iterations
        self.cache: dict = {}
        self.sparse_nodes = [n for n in sparse_gm.graph.nodes]
        self.dense_by_name = {n.name: n for n in dense_gm.graph.nodes}
        self.needed = _ancestors(sparse_gm.graph)
        dense_needed = _ancestors(dense_gm.graph)
        self.activation_names, sparse_params = _classify(sparse_gm, self.needed)
        dense_activations, dense_params = _classify(dense_gm, dense_needed)
        if dense_activations != self.activation_names:
            only = sorted(dense_activations ^ self.activation_names)
            raise NotCertifiable(f"dense and sparse graphs differ in their computation nodes ({', '.join(only[:5])})")
        self.sparse_params = _evaluate_params(sparse_gm, sparse_params)
        self.dense_params = _evaluate_params(dense_gm, dense_params)
        self.changed: set[str] = set()
        self.unruled: set[str] = set()
        self.unmodelled: dict[str, str] = {}  # node -> op, tensor ops that got the fallback rule
        self.gemm_nodes: list[str] = []
        self.max_unary_lip = 1.0
        self.chain = True
        self.keep = 0
        for node in self.sparse_nodes:
            if node.name not in self.activation_names or node.op == "placeholder":
                continue
            self._match(node)
            if node.target in _GEMM_LIKE:
                self.gemm_nodes.append(node.name)
            if node.target in _UNARY and not callable(_UNARY[node.target]):
                self.max_unary_lip = max(self.max_unary_lip, _UNARY[node.target])
            tensor_inputs = [a for a in node.all_input_nodes if a.name in self.activation_names
                             and not isinstance(a.meta.get("val"), (int, torch.SymInt))]
            if len(tensor_inputs) > 1:
                self.chain = False
        self._check_in_place()
        placeholders_s = [n.name for n in self.sparse_nodes if n.op == "placeholder"]
        placeholders_d = [n.name for n in dense_gm.graph.nodes if n.op == "placeholder"]
        if placeholders_s != placeholders_d:
            raise NotCertifiable("dense and sparse graphs have different inputs")
        self.placeholders = placeholders_s
        self.sources = [n.name for n in self.sparse_nodes if n.name in self.changed]
        self.source_index = {name: i for i, name in enumerate(self.sources)}
        self.conv_geometry: dict[str, dict] = {}  # conv node -> stride/padding/... and input spatial size
        self.input_norms: dict[str, list[torch.Tensor]] = {}  # GEMM node -> per-sample ||x_(j-1)||
        self.network_input_norms: list[torch.Tensor] = []
        # per batch state
        self.dense_env: dict[str, object] = {}
        self.sparse_env: dict[str, object] = {}
        self.contrib: dict[str, object] = {}

    # -- structure -------------------------------------------------------------------------------------
    def _check_in_place(self) -> None:
        """An in-place op runs on copies here (its rules relax around its input's value); that is only the
        graph's meaning if nothing reads the mutated input afterwards. Refuse the rare graph where something does.
        """
        order = {node.name: i for i, node in enumerate(self.sparse_nodes)}
        for node in self.sparse_nodes:
            schema = getattr(node.target, "_schema", None)
            if node.op != "call_function" or schema is None or not schema.is_mutable:
                continue
            for index, argument in enumerate(schema.arguments):
                if argument.alias_info is None or not argument.alias_info.is_write:
                    continue
                value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
                if not isinstance(value, torch.fx.Node) or value.name not in self.activation_names:
                    continue
                later = [u.name for u in value.users if u is not node and order.get(u.name, -1) > order[node.name]]
                if later:
                    raise NotCertifiable(f"node '{node.name}' ({_op_name(node.target)}) writes into '{value.name}', "
                                         f"which '{later[0]}' reads afterwards: in-place aliasing is not modelled")


    def _match(self, node: torch.fx.Node) -> None:
        if node.op != "call_function":
            raise NotCertifiable(f"node '{node.name}': {node.op} '{node.target}' is not modelled")
        dense = self.dense_by_name.get(node.name)
        if dense is None or dense.op != node.op or dense.target != node.target:
            raise NotCertifiable(f"node '{node.name}' differs between the dense and sparse graphs")
        if node.target not in _RULES:
            # no bound rule: shape arithmetic (sym_size, ...) needs none; a tensor op gets the sound fallback
            # (unbounded wherever its input may have changed) and is named in the report, see _run_node
            self.unruled.add(node.name)
        changed = False

        def compare(s, d):
            nonlocal changed
            s_act = isinstance(s, torch.fx.Node) and s.name in self.activation_names
            d_act = isinstance(d, torch.fx.Node) and d.name in self.activation_names
            if s_act or d_act:
                if not (s_act and d_act and s.name == d.name):
                    raise NotCertifiable(f"node '{node.name}': inputs differ between the dense and sparse graphs")
                return
            s_val = self.sparse_params[s.name] if isinstance(s, torch.fx.Node) else s
            d_val = self.dense_params[d.name] if isinstance(d, torch.fx.Node) else d
            if isinstance(s, torch.fx.Node) or isinstance(d, torch.fx.Node):
                if not _same_value(s_val, d_val):
                    changed = True
                return
            if isinstance(s, (list, tuple)) and isinstance(d, (list, tuple)) and len(s) == len(d):
                for a, b in zip(s, d):
                    compare(a, b)
                return
            if isinstance(s, dict) and isinstance(d, dict) and s.keys() == d.keys():
                for key in s:
                    compare(s[key], d[key])
                return
            if not _same_value(s, d):
                raise NotCertifiable(f"node '{node.name}': arguments differ between the dense and sparse graphs")

        s_args = list(node.args) + [None] * max(0, len(dense.args) - len(node.args))
        d_args = list(dense.args) + [None] * max(0, len(node.args) - len(dense.args))
        compare(s_args, d_args)
        keys = set(node.kwargs) | set(dense.kwargs)
        compare({k: node.kwargs.get(k) for k in keys}, {k: dense.kwargs.get(k) for k in keys})
        if changed:
            self.changed.add(node.name)

    # -- values ----------------------------------------------------------------------------------------
    def cross_value(self, value):
        if isinstance(value, torch.fx.Node):
            if value.name in self.activation_names:
                return self.dense_env[value.name]
            return self.sparse_params[value.name]
        return value

    def is_tensor_activation(self, value) -> bool:
        if not isinstance(value, torch.fx.Node) or value.name not in self.activation_names:
            return False
        return isinstance(self.dense_env.get(value.name), (torch.Tensor, list, tuple))

    def substitute(self, node: torch.fx.Node, replace: dict[str, object]):
        """The node's (args, kwargs) with cross values, some activations replaced."""
        def lookup(a):
            if isinstance(a, torch.fx.Node):
                return replace[a.name] if a.name in replace else self.cross_value(a)
            return a
        return map_aggregate((node.args, node.kwargs), lookup)

    def delta_of(self, node: torch.fx.Node) -> torch.Tensor:
        c = self.contrib[node.name]
        if c is None or isinstance(c, list):
            raise NotCertifiable(f"node '{node.name}': its value is not modelled")
        return c.sum(1)

    # -- gemm ------------------------------------------------------------------------------------------
    def gemm_operator(self, ctx: _Ctx):
        """(activation input node, operator-norm bound of the sparse op in that input, operator matrix)."""
        node = ctx.node
        target = node.target
        key = ("gemm", node.name)
        if target in _CONV or target in _CONV_TRANSPOSE:
            if target in _CONV:
                p = conv_params(node)
                x, w_node = p["input"], p["weight"]
                transposed, groups = p["transposed"], p["groups"]
                stride, padding, dilation = p["stride"], p["padding"], p["dilation"]
            else:
                x, w_node = node.args[0], node.args[1]
                dims = self.cross_value(w_node).dim() - 2
                lit = lambda i, d: node.args[i] if len(node.args) > i else d  # noqa: E731
                stride, padding = lit(3, [1] * dims), lit(4, [0] * dims)
                groups, dilation = lit(6, 1), lit(7, [1] * dims)
                transposed = True
            if not ctx.is_act(x) or ctx.is_act(w_node):
                ctx.fail("only convolutions of an activation by a constant weight are modelled")
            if ctx.is_act(p["bias"] if target in _CONV else (node.args[2] if len(node.args) > 2 else None)):
                ctx.fail("bias computed from activations")
            weight = self.cross_value(w_node)
            x_value = self.cross_value(x)
            spatial = tuple(ctx.out_dense.shape[2:]) if transposed else tuple(x_value.shape[2:])
            key = key + (spatial,)
            self.conv_geometry[node.name] = dict(spatial=spatial, stride=stride, padding=padding,
                                                 dilation=dilation, groups=int(groups), transposed=transposed)
            if key not in self.cache:
                # a transposed convolution is the adjoint of the convolution with the same weight on its output grid
                self.cache[key] = conv_operator_norm_bound(weight, spatial, stride, padding, dilation, int(groups))
            return x, self.cache[key], weight.detach().reshape(weight.shape[0], -1)
        if target == aten.linear.default:
            x, w_node = node.args[0], node.args[1]
            if not ctx.is_act(x) or ctx.is_act(w_node) or ctx.is_act(node.args[2] if len(node.args) > 2 else None):
                ctx.fail("only linear layers of an activation by constant weights are modelled")
            if self.cross_value(x).dim() < 2:
                ctx.fail("a 1-D input has no batch axis")
            weight = self.cross_value(w_node)
            if key not in self.cache:
                self.cache[key] = matrix_norm_bound(weight)
            return x, self.cache[key], weight.detach()
        if target == aten.addmm.default:
            bias, left, right = node.args[0], node.args[1], node.args[2]
            beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
            if ctx.is_act(bias) or not ctx.is_act(left) or ctx.is_act(right) or beta != 1:
                ctx.fail("only addmm(constant bias, activation, constant weight) is modelled")
            weight = self.cross_value(right)
            if key not in self.cache:
                self.cache[key] = abs(float(alpha)) * matrix_norm_bound(weight)
            return left, self.cache[key], weight.detach().t()
        # mm / matmul / bmm
        left, right = node.args[0], node.args[1]
        if ctx.is_act(left) and ctx.is_act(right):
            ctx.fail("product of two activations is not modelled")
        if ctx.is_act(left):
            weight = self.cross_value(right)
            if weight.dim() < 2 or self.cross_value(left).dim() < 2:
                ctx.fail("only matrix weights are modelled")
            if key not in self.cache:
                self.cache[key] = matrix_norm_bound(weight)
            return left, self.cache[key], (weight.detach().t() if weight.dim() == 2 else weight.detach())
        weight = self.cross_value(left)
        if self.cross_value(right).dim() < 3 or weight.dim() < 2:
            ctx.fail("a constant left operand would contract the batch axis")
        if key not in self.cache:
            self.cache[key] = matrix_norm_bound(weight)
        return right, self.cache[key], weight.detach()

    def weight_only_term(self, node: torch.fx.Node, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per sample ``||(W_s - W_d) x_d||`` (bias off) and ``||b_s - b_d||`` broadcast, for GEMM nodes."""
        target = node.target
        dense = self.dense_by_name[node.name]

        def value_d(a):
            if isinstance(a, torch.fx.Node):
                return self.dense_env[a.name] if a.name in self.activation_names else self.dense_params[a.name]
            return a

        try:
            if target in _CONV:
                ps, pd = conv_params(node), conv_params(dense)
                if ps["transposed"]:
                    return None
                w_s, w_d = self.cross_value(ps["weight"]), value_d(pd["weight"])
                b_s, b_d = self.cross_value(ps["bias"]), value_d(pd["bias"])
                x = self.dense_env[ps["input"].name]
                # a diagnostic split of the exact local term: the model's dtype is precise enough (float64
                # convolutions are slow on CPU)
                dw = (w_s.double() - w_d.double()).to(x.dtype)
                dims = dw.dim() - 2
                conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
                        3: torch.nn.functional.conv3d}[dims]
                y = conv(x, dw, None, ps["stride"], ps["padding"], ps["dilation"], ps["groups"])
                positions = math.prod(y.shape[2:])
            elif target in (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default):
                if target == aten.linear.default:
                    x_node, w_pos, b_pos, transpose = node.args[0], 1, 2, True
                elif target == aten.addmm.default:
                    x_node, w_pos, b_pos, transpose = node.args[1], 2, 0, False
                else:
                    if not (isinstance(node.args[0], torch.fx.Node) and node.args[0].name in self.activation_names):
                        return None
                    x_node, w_pos, b_pos, transpose = node.args[0], 1, None, False
                get = lambda nd, i: nd.args[i] if len(nd.args) > i else None  # noqa: E731
                w_s, w_d = self.cross_value(get(node, w_pos)), value_d(get(dense, w_pos))
                b_s = self.cross_value(get(node, b_pos)) if b_pos is not None else None
                b_d = value_d(get(dense, b_pos)) if b_pos is not None else None
                dw = w_s.double() - w_d.double()
                x = self.dense_env[x_node.name].double()
                y = x @ (dw.t() if transpose else dw)
                positions = y.numel() // max(1, n * y.shape[-1])
            else:
                return None
        except Exception:  # noqa: BLE001 - a diagnostic; the bound itself does not depend on it
            return None
        weight_term = _per_sample_norm(y, n)
        db = (b_s.double() if isinstance(b_s, torch.Tensor) else 0.0) - (b_d.double() if isinstance(b_d, torch.Tensor) else 0.0)
        bias_norm = float(torch.as_tensor(db).norm()) * math.sqrt(positions)
        return weight_term, torch.full((n,), bias_norm, dtype=torch.float64)

    def _propagate(self, node, element_gains, n: int, s_count: int) -> torch.Tensor:
        """sum_i G_i * contrib(a_i), one column per changed node (an unbounded parent stays unbounded)."""
        c = torch.zeros(n, s_count, dtype=torch.float64)
        for a, gain in element_gains:
            parent = self.contrib.get(a.name)
            if parent is None or isinstance(parent, list):
                raise NotCertifiable(f"node '{node.name}': input '{a.name}' is not modelled")
            # an infinite gain (e.g. a product with an unbounded input) is sound, only useless
            g = torch.nan_to_num(torch.as_tensor(gain, dtype=torch.float64), nan=math.inf, posinf=math.inf)
            g = g.reshape(-1, 1) if g.dim() else g
            # where the input cannot change the output cannot either (0 * inf is 0 here); else inf stays inf
            c = c + torch.where(parent == 0, torch.zeros_like(parent), g * parent)
        return torch.nan_to_num(c, nan=math.inf, posinf=math.inf)

    def _unbounded(self, acts: set[str], n: int, s_count: int) -> torch.Tensor:
        """The fallback for an op without a bound rule (any Lipschitz constant, any mixing of samples):
        exactly 0 where no input of the op can differ between the models (same inputs, same op), else
        unbounded -- for every sample of the batch, since the op might mix samples. The infinite part is
        charged to the changed nodes upstream that caused it."""
        c = torch.zeros(n, s_count, dtype=torch.float64)
        for name in acts:
            parent = self.contrib.get(name)
            if parent is None or isinstance(parent, list):
                raise NotCertifiable(f"node '{name}': its value is not modelled")
            c[:, (parent != 0).any(0)] = math.inf
        return c

    # -- one batch -------------------------------------------------------------------------------------
    def run_batch(self, inputs: tuple[torch.Tensor, ...], stats: dict[str, _LayerStats], checks: dict,
                  keep: int | None = None) -> list:
        """One batch; only its first ``keep`` samples are real (the rest pads a static batch) and counted."""
        if len(inputs) != len(self.placeholders):
            raise NotCertifiable(f"the model takes {len(self.placeholders)} inputs, a batch has {len(inputs)}")
        n = int(inputs[0].shape[0])
        if any(not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n for t in inputs):
            raise NotCertifiable("every input must be a tensor with the batch on axis 0")
        s_count = len(self.sources)
        keep = n if keep is None else keep
        self.keep = keep
        self.dense_env, self.sparse_env, self.contrib = {}, {}, {}
        previous = getattr(self, "taylor", None)
        self.taylor = TaylorModel(self)
        self.crown = CrownModel(self)
        if previous is not None:  # the self-check counts over all batches
            self.taylor.violations, self.taylor.worst = previous.violations, previous.worst
            self.taylor.worst_node = previous.worst_node
        last_use: dict[str, int] = {}
        order = {node.name: i for i, node in enumerate(self.sparse_nodes)}
        for node in self.sparse_nodes:
            for a in node.all_input_nodes:
                last_use[a.name] = max(last_use.get(a.name, -1), order[node.name])
        self.network_input_norms.append(_per_sample_norm(inputs[0], n)[:keep])
        for name, value in zip(self.placeholders, inputs):
            # separate copies: an in-place op on an input must not run twice on one tensor
            self.dense_env[name], self.sparse_env[name] = value, value.clone()
            self.contrib[name] = torch.zeros(n, s_count, dtype=torch.float64)
            self.taylor.placeholder(name)
        outputs = None
        with torch.no_grad():
            for node in self.sparse_nodes:
                if node.op == "output":
                    outputs = node.args[0]
                    break
                if node.name not in self.activation_names or node.op == "placeholder":
                    continue
                try:
                    self._run_node(node, n, s_count, stats, checks)
                except NotCertifiable:
                    raise
                except Exception as exc:  # noqa: BLE001 - never a crash: name the node and what went wrong
                    first = (str(exc).strip().splitlines() or [""])[0][:200]
                    raise NotCertifiable(f"node '{node.name}' ({_op_name(node.target)}) failed: "
                                         f"{type(exc).__name__}: {first}") from exc
                for a in node.all_input_nodes:
                    if last_use.get(a.name) == order[node.name] and a.name in self.dense_env:
                        if a.name in self.placeholders:
                            continue
                        del self.dense_env[a.name], self.sparse_env[a.name]
                        self.contrib.pop(a.name, None)
                        self.taylor.boxes.pop(a.name, None)
        flat = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        self.output_names = [out.name if isinstance(out, torch.fx.Node) else None for out in flat]
        results = []
        for out in flat:
            if not isinstance(out, torch.fx.Node) or out.name not in self.activation_names:
                results.append(None)
                continue
            c = self.contrib[out.name]
            if c is None or isinstance(c, list):
                raise NotCertifiable(f"output '{out.name}' is not modelled")
            box = self.taylor.boxes.get(out.name)
            z = self.dense_env[out.name]
            if box is None and isinstance(z, torch.Tensor):  # nothing upstream changed
                box = (torch.zeros(z.shape, dtype=torch.float64), torch.zeros(z.shape, dtype=torch.float64))
            if isinstance(box, tuple):
                box = (box[0][:keep], box[1][:keep])
            results.append(tuple(v[:keep] for v in (self.dense_env[out.name], self.sparse_env[out.name], c))
                           + (box,))
        return results

    def _run_node(self, node, n: int, s_count: int, stats: dict, checks: dict) -> None:
        dense = self.dense_by_name[node.name]

        def lookup_dense(a):
            if isinstance(a, torch.fx.Node):
                return self.dense_env[a.name] if a.name in self.activation_names else self.dense_params[a.name]
            return a

        def lookup_sparse(a):
            if isinstance(a, torch.fx.Node):
                return self.sparse_env[a.name] if a.name in self.activation_names else self.sparse_params[a.name]
            return a

        if node.target is operator.getitem:
            source, index = node.args[0], node.args[1]
            self.dense_env[node.name] = self.dense_env[source.name][index]
            self.sparse_env[node.name] = self.sparse_env[source.name][index]
            parent = self.contrib[source.name]
            picked = parent[index] if isinstance(parent, list) else None
            self.contrib[node.name] = picked
            self.taylor.getitem(node)
            self.crown.getitem(node)
            return

        d_args, d_kwargs = map_aggregate((dense.args, dense.kwargs), lookup_dense)
        s_args, s_kwargs = map_aggregate((node.args, node.kwargs), lookup_sparse)
        if _mutates(node.target):
            # an in-place op (relu_, hardswish_, add_ ...) must not overwrite its input's recorded value: the
            # Taylor and CROWN rules relax the op around that (pre-activation) dense value afterwards
            d_args, d_kwargs = _fresh((d_args, d_kwargs))
            s_args, s_kwargs = _fresh((s_args, s_kwargs))
        v_dense = node.target(*d_args, **d_kwargs)
        v_sparse = node.target(*s_args, **s_kwargs)
        self.dense_env[node.name], self.sparse_env[node.name] = v_dense, v_sparse

        tensors_d = list(v_dense) if isinstance(v_dense, (list, tuple)) else [v_dense]
        if not any(isinstance(t, torch.Tensor) for t in tensors_d):
            # shape arithmetic (sym sizes): must agree; carries no perturbation
            if not _same_value(v_dense, v_sparse):
                raise NotCertifiable(f"node '{node.name}': a non-tensor value differs between the models")
            self.contrib[node.name] = None
            self.taylor.boxes[node.name] = None
            return

        ctx = _Ctx(node, self, v_dense)
        tuple_out = isinstance(v_dense, (list, tuple))
        if node.target in _RULES:
            gains = _RULES[node.target](ctx)
        else:
            self.unmodelled.setdefault(node.name, _op_name(node.target))
            gains = [_UNBOUNDED] * len(v_dense) if tuple_out else _UNBOUNDED
        per_output = gains if tuple_out else [gains]
        if tuple_out and len(per_output) != len(v_dense):
            raise NotCertifiable(f"node '{node.name}': internal rule mismatch")
        tensors_s = list(v_sparse) if tuple_out else [v_sparse]
        acts = {a.name for a in _act_args(ctx)}
        local_parts = None
        local_vectors: list = [None] * len(tensors_d)
        if node.name in self.changed:
            x_args, x_kwargs = self.substitute(node, {})
            if _mutates(node.target):
                x_args, x_kwargs = _fresh((x_args, x_kwargs))
            cross = node.target(*x_args, **x_kwargs)
            cross_list = list(cross) if tuple_out else [cross]
            local_vectors = [((c.double() - d.double()) if isinstance(c, torch.Tensor) and isinstance(d, torch.Tensor)
                              and c.shape == d.shape and c.is_floating_point() else None)
                             for c, d in zip(cross_list, tensors_d)]
            local_parts = [(_diff_norm(c, d, n)
                            if isinstance(c, torch.Tensor) and isinstance(d, torch.Tensor) and c.shape == d.shape
                            and c.dim() > 0 and c.shape[0] == n else None) for c, d in zip(cross_list, tensors_d)]
        contributions = []
        for k, element_gains in enumerate(per_output):
            if element_gains is None:  # e.g. pooling indices, saved statistics: consumers will be refused
                contributions.append(None)
                continue
            t = tensors_d[k]
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise NotCertifiable(f"node '{node.name}' ({_op_name(node.target)}): output shape {shape} "
                                     f"does not keep the batch of {n} on axis 0")
            if element_gains is _UNBOUNDED:
                c = self._unbounded(acts, n, s_count)
                covered = acts
            else:
                covered = {a.name for a, _ in element_gains}
            if covered != acts:
                missing = sorted(acts - covered)
                raise NotCertifiable(f"node '{node.name}' ({_op_name(node.target)}): activation input(s) "
                                     f"{', '.join(missing)} are not modelled in this position")
            if element_gains is not _UNBOUNDED:
                c = self._propagate(node, element_gains, n, s_count)
            if local_parts is not None:
                if local_parts[k] is None:
                    raise NotCertifiable(f"node '{node.name}': changed parameters change an output's shape")
                c[:, self.source_index[node.name]] += local_parts[k]
            contributions.append(c)
            if t.is_floating_point():  # self-check against the actual sparse execution
                actual = _diff_norm(tensors_s[k], t, n)
                excess = actual - c.sum(1) * (1 + CHECK_RTOL) - CHECK_ATOL * (1 + _per_sample_norm(t, n))
                excess = excess[: self.keep]
                worst = float(excess.max())
                if worst > checks.get("worst_excess", 0.0):
                    checks["worst_excess"], checks["worst_node"] = worst, node.name
                checks["violations"] = checks.get("violations", 0) + int((excess > 0).sum())
        self.contrib[node.name] = contributions if tuple_out else contributions[0]
        l2_bounds = [c.sum(1) if isinstance(c, torch.Tensor) else None for c in contributions]
        actual = [((s.double() - d.double()) if isinstance(s, torch.Tensor) and isinstance(d, torch.Tensor)
                   and d.is_floating_point() and s.shape == d.shape else None) for s, d in zip(tensors_s, tensors_d)]
        self.taylor.run(node, v_dense, tuple_out, per_output, local_vectors, _UNBOUNDED, l2_bounds, actual)
        try:
            self.crown.record(node, v_dense, tuple_out, local_vectors)
        except Exception as exc:  # noqa: BLE001 - the margin bound then stops at this node's box (sound)
            self.crown.fallback(node, f"{type(exc).__name__}: {str(exc)[:120]}")
        if node.target in _GEMM_LIKE:
            x_node, _, _ = self.gemm_operator(ctx)
            norms = self.input_norms.setdefault(node.name, [])
            norms.append(_per_sample_norm(self.dense_env[x_node.name], n)[: self.keep])
        if local_parts is not None:
            record = stats.setdefault(node.name, _LayerStats(node.name, _op_name(node.target)))
            local = local_parts[0] if local_parts[0] is not None else torch.zeros(n, dtype=torch.float64)
            record.local.append(local[: self.keep])
            if node.target in _GEMM_LIKE:
                terms = self.weight_only_term(node, n)
                if terms is not None:
                    record.weight_term.append(terms[0][: self.keep])
                    record.bias_term.append(terms[1][: self.keep])
                _, record.gain, _ = self.gemm_operator(ctx)


# ----------------------------------------------------------------------------------------------------------
# public API


def _as_batches(batches) -> Iterable[tuple[torch.Tensor, ...]]:
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            yield (batch,)
        else:
            yield tuple(batch)


def _limit(batches, max_samples: int | None) -> Iterable[tuple[torch.Tensor, ...]]:
    seen = 0
    for batch in _as_batches(batches):
        if max_samples is not None:
            if seen >= max_samples:
                return
            batch = tuple(t[: max_samples - seen] for t in batch)
        seen += int(batch[0].shape[0]) if batch and batch[0].dim() else 0
        yield batch


def static_batch_size(gm: torch.fx.GraphModule) -> int | None:
    """The batch size baked into a graph exported without a dynamic batch (from its inputs' recorded
    shapes), or None (dynamic, or not recorded). Such a graph may hold the size in its ops too
    (``view(x, [8, 1280])``), so it only runs on batches of exactly that size."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            size = value.shape[0]
            return int(size) if isinstance(size, int) else None
    return None


def _rebatch(batches: Iterable[tuple[torch.Tensor, ...]], size: int | None):
    """(batch, real samples) pairs; for a static batch ``size``, batches of exactly that size, the last one
    padded by repeating its last sample (the padding's results are dropped; samples never mix: the
    certificate refuses ops that mix them)."""
    if size is None:
        for batch in batches:
            yield batch, int(batch[0].shape[0])
        return
    pending: list[tuple[torch.Tensor, ...]] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += int(batch[0].shape[0])
        while count >= size:
            joined = tuple(torch.cat(parts) for parts in zip(*pending))
            yield tuple(t[:size] for t in joined), size
            rest = tuple(t[size:] for t in joined)
            count -= size
            pending = [rest] if count else []
    if count:
        joined = tuple(torch.cat(parts) for parts in zip(*pending))
        pad = size - count
        yield tuple(torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in joined), count


def _median(values: torch.Tensor) -> float | None:
    return float(values.median()) if values.numel() else None


def _inf_norm(matrix: torch.Tensor) -> float:
    """Max absolute row sum (the induced infinity norm the Gumbel paper's Lemmas 3.3/3.6 use)."""
    m = matrix.detach().double()
    return float(m.abs().reshape(m.shape[0], -1).sum(1).max()) if m.numel() else 0.0


def certify(dense_gm: torch.fx.GraphModule, sparse_gm: torch.fx.GraphModule, layers=None, batches=(), *,
            iterations: int = 30, per_sample: bool = False, max_samples: int | None = None,
            output: int | None = None) -> dict:
    """Certify, per calibration sample, that masking cannot change the prediction; rank risky layers.

    ``layers`` (``find_layers`` output, optional) only names the per-layer
    rows. ``iterations`` is the power-iteration count for the reported
    operator-norm *estimates* (the bound uses guaranteed norms). ``output``
    picks the graph output to certify (default: the first 2-D output with
    more than one column, else output 0). Returns JSON-serialisable results:
    ``summary`` (samples, certifiable, certified_fraction,
    observed_unchanged_fraction, median_bound, median_actual_change,
    median_looseness, not_certifiable, self_check), ``layers`` (ranked by
    share of the bound, with the Gumbel-paper quantities under ``gumbel``),
    and with ``per_sample=True`` the per-sample arrays.
    See the module docstring for the math and its limits.
    """
    names = {layer.node_name: layer.name for layer in (layers or [])}
    reasons: list[str] = []
    try:
        runner = _Certifier(dense_gm, sparse_gm, iterations)
    except NotCertifiable as exc:
        runner, reasons = None, [str(exc)]
    except Exception as exc:  # noqa: BLE001 - never a crash: say what failed
        runner, reasons = None, [f"graph analysis failed: {type(exc).__name__}: {str(exc)[:200]}"]
    stats: dict[str, _LayerStats] = {}
    checks: dict = {}
    collected = {"bound": [], "actual": [], "margin": [], "dense_pred": [], "sparse_pred": [], "contrib": [],
                 "z_inf": [], "global_bound": [], "local_bound": [], "local_certified": [],
                 "crown_certified": [], "crown_margin": []}
    crown_errors: list[str] = []
    crown_concretised: dict[str, str] = {}
    crown_space: set[str] = set()
    crown_layers: dict[str, list] = {}  # node -> per batch [n] margin used; "" -> the total
    samples = 0
    chosen = output
    for batch, keep in _rebatch(_limit(batches, max_samples), static_batch_size(sparse_gm)):
        results = None
        if runner is not None and not reasons:
            try:
                results = runner.run_batch(batch, stats, checks, keep)
            except NotCertifiable as exc:
                reasons.append(str(exc))
        if results is None:  # still report what happened, without a bound
            try:
                with torch.no_grad():
                    outs_d, outs_s = flat_outputs(dense_gm(*batch)), flat_outputs(sparse_gm(*batch))
            except Exception as exc:  # noqa: BLE001 - the model itself does not run on this batch
                reasons.append(f"the model does not run on a batch of {int(batch[0].shape[0])}: "
                               f"{type(exc).__name__}: {str(exc)[:200]}")
                break
            results = [(d[:keep], s[:keep], None, None) for d, s in zip(outs_d, outs_s)]
        if chosen is None:
            chosen = next((i for i, r in enumerate(results) if r is not None and r[0].dim() == 2 and r[0].shape[1] > 1), 0)
        if chosen >= len(results) or results[chosen] is None:
            reasons.append(f"output {chosen} is not an input-dependent tensor")
            break
        z_d, z_s, c, box = results[chosen]
        n = z_d.shape[0]
        samples += n
        if c is not None and z_d.dim() == 2 and z_d.shape[1] > 1:
            z_inf_batch = z_d.detach().double().reshape(n, -1).abs().amax(1)
            collected["crown_certified"].append(torch.zeros(n, dtype=torch.bool))
            try:
                out_name = runner.output_names[chosen]
                z_full = runner.dense_env[out_name]
                full_box = runner.taylor.boxes.get(out_name)
                if not isinstance(full_box, tuple):
                    full_box = None
                lower, magnitude, z_ref, start = runner.crown.margins(
                    out_name, z_full, full_box, FP_SLACK * (1 + z_full.detach().double().abs().amax(1)))
                lower, magnitude, z_ref = lower[:n], magnitude[:n], z_ref[:n]
                top = z_d.detach().double().argmax(1)
                slack_ref = FP_SLACK * (1 + z_ref.abs().amax(1))
                collected["crown_certified"][-1] = crown_certificate(lower, magnitude, z_ref, top, slack_ref)
                margins = certified_margins(lower, z_ref, top)
                binding = margins.argmin(1)  # the class that comes closest to overtaking
                collected["crown_margin"].append(margins.gather(1, binding[:, None])[:, 0])
                crown_space.add("output" if start == out_name else f"logits '{start}' (the output is their softmax)")
                batch_layers = {"": -lower.gather(1, binding[:, None])[:, 0]}
                for name in runner.sources:
                    # margin this layer's change takes from the binding class pair (negative: it adds margin)
                    term = runner.crown.local_terms.get(name)
                    batch_layers[name] = (-term.t()[:n].gather(1, binding[:, None])[:, 0] if term is not None
                                          else torch.zeros(n, dtype=torch.float64))
                for name, used in batch_layers.items():
                    crown_layers.setdefault(name, []).append(used)
                crown_concretised.update({k: v for k, v in runner.crown.concretised.items()
                                          if start == out_name or k not in runner.crown.softmax_inputs})
            except Exception as exc:  # noqa: BLE001 - the other bounds still stand; say why this one is missing
                crown_errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        collected["actual"].append(_diff_norm(z_s, z_d, n))
        z_inf = z_d.detach().double().reshape(n, -1).abs().amax(1)
        collected["z_inf"].append(z_inf)
        if c is not None:
            global_bound = c.sum(1)
            collected["global_bound"].append(global_bound)
            collected["contrib"].append(c)
            local_bound = torch.full_like(global_bound, math.inf)
            if isinstance(box, tuple) and z_d.dim() >= 1:
                local_certified, local_bound = output_certificate(
                    (box[0].reshape(n, -1), box[1].reshape(n, -1)), z_d.reshape(n, -1), FP_SLACK * (1 + z_inf))
                if z_d.dim() == 2 and z_d.shape[1] > 1:
                    collected["local_certified"].append(local_certified)
            collected["local_bound"].append(local_bound)
            collected["bound"].append(torch.minimum(global_bound, local_bound))
        if z_d.dim() == 2 and z_d.shape[1] > 1:
            top = z_d.detach().double().topk(2, dim=1).values
            collected["margin"].append(top[:, 0] - top[:, 1])
            collected["dense_pred"].append(z_d.argmax(1))
            collected["sparse_pred"].append(z_s.argmax(1))
    certifiable = runner is not None and not reasons and samples > 0
    actual = torch.cat(collected["actual"]) if collected["actual"] else torch.zeros(0, dtype=torch.float64)
    classifier = bool(collected["margin"])
    summary: dict = {
        "samples": samples, "output": chosen, "certifiable": certifiable, "not_certifiable": reasons,
        "margin_rule": ("prediction kept if top1 - top2 > sqrt(2) * bound (l2 bound on the output change), or if "
                        "z_i - z_j > (c_j - c_i) + r_i + r_j for every j (elementwise Taylor box c +- r)"),
        "median_actual_change": _median(actual), "max_actual_change": float(actual.max()) if actual.numel() else None,
    }
    if runner is not None and runner.unmodelled:
        summary["unmodelled_ops"] = [
            f"node '{name}' ({op}): no bound rule; bounded as 'anything' wherever its input may change"
            for name, op in runner.unmodelled.items()]
    result: dict = {"summary": summary, "layers": []}
    if classifier:
        dense_pred, sparse_pred = torch.cat(collected["dense_pred"]), torch.cat(collected["sparse_pred"])
        unchanged = dense_pred == sparse_pred
        summary["observed_unchanged_fraction"] = float(unchanged.double().mean())
        margin = torch.cat(collected["margin"])
    if not certifiable:
        summary.update(certified_fraction=0.0 if classifier else None, median_bound=None, median_looseness=None)
        return result
    bound = torch.cat(collected["bound"])
    contrib = torch.cat(collected["contrib"])
    z_inf = torch.cat(collected["z_inf"])
    positive = actual > 0
    looseness = bound[positive] / actual[positive]
    finite = torch.isfinite(bound)
    summary["unbounded_samples"] = int((~finite).sum())
    summary.update(
        median_bound=_median(bound), max_bound=float(bound.max()) if bound.numel() else None,
        median_looseness=_median(looseness),
        median_bound_over_median_actual=(_median(bound) / _median(actual)
                                         if actual.numel() and _median(actual) > 0 else None),
        self_check={"violations": int(checks.get("violations", 0)),
                    "worst_excess": float(checks.get("worst_excess", 0.0)),
                    "worst_node": checks.get("worst_node"),
                    "box_violations": int(runner.taylor.violations) if hasattr(runner, "taylor") else 0,
                    "box_worst_excess": float(runner.taylor.worst) if hasattr(runner, "taylor") else 0.0,
                    "box_worst_node": runner.taylor.worst_node if hasattr(runner, "taylor") else None,
                    "note": "observed per-node changes that exceed the per-node bound, and per-sample node values "
                            "outside the elementwise box (both must be 0)"},
    )
    global_bound, local_bound = torch.cat(collected["global_bound"]), torch.cat(collected["local_bound"])
    summary["bounds"] = {
        "median_global_l2": _median(global_bound), "median_taylor_l2": _median(local_bound),
        "taylor_tighter_fraction": float((local_bound < global_bound).double().mean()) if samples else None,
        "note": "bound = min(global: per-sample l2 norms through operator-norm gains; taylor: elementwise "
                "first-order term + remainder box around the dense activations, see analysis/taylor.py)",
    }
    global_bound_all = torch.cat(collected["global_bound"])
    if classifier:
        slack = FP_SLACK * (1 + z_inf)
        certified = margin > SQRT2 * bound * (1 + NORM_SAFETY) + slack
        taylor_certified = torch.zeros_like(certified)
        if collected["local_certified"]:
            taylor_certified = torch.cat(collected["local_certified"])
        global_certified = margin > SQRT2 * global_bound_all * (1 + NORM_SAFETY) + slack
        certified = certified | taylor_certified
        crown_certified = torch.zeros_like(certified)
        if collected["crown_certified"] and len(torch.cat(collected["crown_certified"])) == len(certified):
            crown_certified = torch.cat(collected["crown_certified"])
        certified = certified | crown_certified
        summary["certified_by"] = {
            "global_l2": float(global_certified.double().mean()), "taylor_box": float(taylor_certified.double().mean()),
            "crown_margins": float(crown_certified.double().mean()),
            "note": "share of samples each bound certifies on its own (a sample counts as certified if any does)"}
        if crown_errors:
            summary["crown_errors"] = crown_errors[:3]
        if crown_concretised:
            summary["crown_concretised"] = [f"node '{k}' ({v}): no linear relaxation; bounded by its box"
                                            for k, v in list(crown_concretised.items())[:10]]
        if collected["crown_margin"]:
            summary["median_certified_margin"] = _median(torch.cat(collected["crown_margin"]))
            summary["certified_margin_of"] = sorted(crown_space)
        if crown_layers and len(torch.cat(crown_layers[""])) == len(certified):
            total_used = torch.cat(crown_layers[""])
            per_layer = {name: torch.cat(parts) for name, parts in crown_layers.items() if name}
            layer_sum = sum(per_layer.values()) if per_layer else torch.zeros_like(total_used)
            summary["margin_used"] = {
                "median_total": _median(total_used),
                "median_by_layers": _median(layer_sum),
                "median_by_nonlinear_ops": _median(total_used - layer_sum),
                "note": "per sample, the margin of the class pair closest to flipping that the bound takes: the "
                        "sum over changed layers of their local term carried linearly to that margin, plus what the "
                        "relaxations of the nonlinear ops (and boxes of ops without one) add (their exact "
                        "curvature where the boxes are tight, so it can be negative)",
            }
            margin_rows = sorted(({"layer": names.get(name, name), "node": name, "median": _median(v),
                                   "max": float(v.max()) if v.numel() else None} for name, v in per_layer.items()),
                                 key=lambda row: -(row["median"] or 0.0))
            result["margin_ranking"] = margin_rows
        summary["certified_fraction"] = float(certified.double().mean())
        summary["certified_but_changed"] = int((certified & ~unchanged).sum())
        summary["median_margin"] = _median(margin)
    else:
        summary["certified_fraction"] = None
    # shares of the bound over the samples with a finite bound (an unmodelled op makes the rest infinite)
    # (the shares split certify's global bound, whose columns follow each changed node through the graph)
    global_finite = torch.isfinite(global_bound)
    total = float(global_bound[global_finite].sum())
    margin_used = ({name: torch.cat(parts) for name, parts in crown_layers.items() if name}
                   if "margin_ranking" in result else None)
    result["layers"] = _layer_table(runner, stats, contrib, total, names, global_finite, margin_used)
    result["graph"] = {"chain": runner.chain, "changed_nodes": len(runner.sources),
                       "gemm_nodes": len(runner.gemm_nodes), "max_activation_lipschitz": runner.max_unary_lip,
                       "gumbel_note": GUMBEL_NOTE}
    if per_sample:
        result["samples"] = {"bound": bound.tolist(), "actual_change": actual.tolist()}
        if classifier:
            result["samples"].update(margin=margin.tolist(), certified=certified.tolist(),
                                     prediction_unchanged=unchanged.tolist())
            if collected["crown_margin"] and len(torch.cat(collected["crown_margin"])) == samples:
                # per sample: min over j != top of z_top - z_j + (lower bound on dz_top - dz_j)
                result["samples"]["crown_margin"] = torch.cat(collected["crown_margin"]).tolist()
    return result


def _layer_table(runner: _Certifier, stats: dict[str, _LayerStats], contrib: torch.Tensor, total: float,
                 names: dict[str, str], finite: torch.Tensor, margin_used: dict | None = None) -> list[dict]:
    # unchanged layers have the same operator in both graphs: reuse the bound the propagation computed
    dense_norms = {name: (_gemm_norm(runner, name, dense=True) if name in runner.changed
                          else _gemm_norm(runner, name, dense=False)) for name in runner.gemm_nodes}
    rows = []
    for name in runner.sources:
        s = stats.get(name)
        if s is None:
            continue
        index = runner.source_index[name]
        local = torch.cat(s.local)
        unbounded = int((~torch.isfinite(contrib[:, index])).sum())
        column = contrib[finite, index]
        local_sum = float(local[finite].sum()) if local.shape == finite.shape else float(local.sum())
        row = {
            "layer": names.get(name, name), "node": name, "op": s.op,
            "local_term": {"median": _median(local), "max": float(local.max()) if local.numel() else None},
            "contribution": {"median": _median(column), "max": float(column.max()) if column.numel() else None},
            "share_of_bound": float(column.sum()) / total if total > 0 else 0.0,
            "downstream_gain": float(column.sum()) / local_sum if local_sum > 0 else None,
        }
        if unbounded:
            row["unbounded_samples"] = unbounded
        used = margin_used.get(name) if margin_used else None
        if used is not None:
            row["margin_used"] = {"median": _median(used), "max": float(used.max()) if used.numel() else None}
        if s.weight_term:
            row["weight_term"] = {"median": _median(torch.cat(s.weight_term))}
            row["bias_term"] = {"median": _median(torch.cat(s.bias_term))}
        if s.gain is not None:
            row["op_norm_bound"] = s.gain
            estimate = _power_estimate(runner, name)
            row["op_norm_estimate"] = estimate
            row.update(_gumbel_quantities(runner, name, dense_norms))
        rows.append(row)
    rows.sort(key=lambda r: -r["share_of_bound"])
    for rank, row in enumerate(rows, 1):
        row["risk_rank"] = rank
    return rows


def _node(runner: _Certifier, name: str, dense: bool = False) -> torch.fx.Node:
    return runner.dense_by_name[name] if dense else next(n for n in runner.sparse_nodes if n.name == name)


def _param(runner: _Certifier, node_arg, dense: bool):
    if not isinstance(node_arg, torch.fx.Node):
        return node_arg
    return (runner.dense_params if dense else runner.sparse_params)[node_arg.name]


def _gemm_weight(runner: _Certifier, name: str, dense: bool):
    """(weight as the op uses it, operator matrix [out, in] or None) of a GEMM node."""
    node = _node(runner, name, dense)
    target = node.target
    if target in _CONV:
        w = _param(runner, conv_params(node)["weight"], dense)
        return w, w.detach().reshape(w.shape[0], -1)
    if target in _CONV_TRANSPOSE:
        w = _param(runner, node.args[1], dense)
        return w, None
    if target == aten.linear.default:
        w = _param(runner, node.args[1], dense)
        return w, w.detach()
    if target == aten.addmm.default:
        w = _param(runner, node.args[2], dense)
        return w, w.detach().t()
    left, right = node.args[0], node.args[1]
    if isinstance(left, torch.fx.Node) and left.name in runner.activation_names:
        w = _param(runner, right, dense)
        return w, (w.detach().t() if isinstance(w, torch.Tensor) and w.dim() == 2 else None)
    w = _param(runner, left, dense)
    return w, (w.detach() if isinstance(w, torch.Tensor) and w.dim() == 2 else None)


def _gemm_norm(runner: _Certifier, name: str, dense: bool, weight: torch.Tensor | None = None) -> float | None:
    """Guaranteed operator-norm bound of a GEMM node's linear part (dense or sparse weights, or ``weight``)."""
    try:
        node = _node(runner, name, dense)
        if weight is None:
            weight, _ = _gemm_weight(runner, name, dense)
            if not dense:
                cached = next((v for k, v in runner.cache.items() if k[:2] == ("gemm", name)), None)
                if cached is not None:
                    return cached
        if node.target in _CONV or node.target in _CONV_TRANSPOSE:
            g = runner.conv_geometry.get(name)
            if g is None:
                return None
            return conv_operator_norm_bound(weight, g["spatial"], g["stride"], g["padding"], g["dilation"],
                                            g["groups"])
        scale = abs(float(node.kwargs.get("alpha", 1))) if node.target == aten.addmm.default else 1.0
        return scale * matrix_norm_bound(weight) if isinstance(weight, torch.Tensor) else None
    except (KeyError, AttributeError, StopIteration, RuntimeError):
        return None


def _power_estimate(runner: _Certifier, name: str) -> float | None:
    """Power-iteration (lower) estimate of the sparse layer's operator norm, to show how tight the bound is."""
    try:
        node = _node(runner, name)
        weight, matrix = _gemm_weight(runner, name, dense=False)
        w = weight.detach().double()
        if node.target in _CONV:
            g = runner.conv_geometry[name]
            if g["transposed"]:
                return None
            conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
                    3: torch.nn.functional.conv3d}[w.dim() - 2]
            shape = (1, w.shape[1] * g["groups"], *g["spatial"])
            forward = lambda z: conv(z, w, None, g["stride"], g["padding"], g["dilation"], g["groups"])  # noqa: E731
            return power_iteration_norm(forward, shape, runner.iterations)
        if matrix is None:
            return None
        m = matrix.double()
        return power_iteration_norm(lambda z: z @ m.t(), (1, m.shape[1]), runner.iterations)
    except (KeyError, AttributeError, StopIteration, RuntimeError):
        return None


def _gumbel_quantities(runner: _Certifier, name: str, dense_norms: dict[str, float | None]) -> dict:
    """Quantities of Lemmas 3.3-3.6 of the Gumbel-masks paper for layer j, named as there.

    ``W_j`` is the dense operator matrix ``[out, in]`` (a convolution's GEMM
    matrix ``Cout x Cin*k*k`` for the entrywise quantities), ``B`` the support
    the sparse weight kept, ``mu(B, W_j) = (B - 1) * W_j`` the masking
    perturbation, ``U_j`` what else changed on the kept support (statistics
    correction), ``dW_j = W_sparse - W_j = mu(B, W_j) + U_j``. ``||.||_inf`` is
    the max absolute row sum, as in Lemmas 3.3 and 3.6; ``||.||`` is the
    operator norm (for convolutions our guaranteed bound of the convolution on
    its input tensor).
    """
    try:
        _, w_s = _gemm_weight(runner, name, dense=False)
        _, w_d = _gemm_weight(runner, name, dense=True)
    except (KeyError, AttributeError, StopIteration):
        return {}
    if w_s is None or w_d is None or w_s.shape != w_d.shape:
        return {}
    w_s, w_d = w_s.double(), w_d.double()
    kept = w_s != 0
    mu = torch.where(kept, torch.zeros_like(w_d), -w_d)
    update = w_s - torch.where(kept, w_d, torch.zeros_like(w_d))
    delta = w_s - w_d
    order = list(runner.gemm_nodes)
    j = order.index(name)
    norms = [dense_norms.get(k) for k in order]
    lip = runner.max_unary_lip
    depth = len(order)
    known = all(v is not None for v in norms)
    prod_others = math.prod(v for k, v in zip(order, norms) if k != name) if known else None
    prod_after = math.prod(norms[j + 1:]) if known else None
    x_prev = _median(torch.cat(runner.input_norms[name])) if runner.input_norms.get(name) else None
    x_in = _median(torch.cat(runner.network_input_norms)) if runner.network_input_norms else None
    w_sparse, _ = _gemm_weight(runner, name, dense=False)
    w_dense, _ = _gemm_weight(runner, name, dense=True)
    norm_delta = _gemm_norm(runner, name, dense=False, weight=w_sparse.double() - w_dense.double())
    ok = norm_delta is not None
    eq30 = (lip ** (depth - j) * prod_after * norm_delta * x_prev
            if ok and prod_after is not None and x_prev is not None else None)
    eq32 = (lip ** depth * norm_delta * x_in * prod_others
            if ok and prod_others is not None and x_in is not None else None)
    return {"gumbel": {
        "L": lip, "d": depth, "j": j + 1,
        "norm_dW_j": norm_delta,
        "norm_dW_j_inf": _inf_norm(delta),
        "norm_mu_B_W_j_inf": _inf_norm(mu),
        "norm_W_j_inf": _inf_norm(w_d),
        "norm_U_j_inf": _inf_norm(update),
        "lemma_3_3_holds": _inf_norm(mu) <= _inf_norm(w_d) * (1 + 1e-12),
        "lemma_3_6_factor_inf": _inf_norm(w_d) + _inf_norm(update),
        "norm_W_j": dense_norms.get(name),
        "prod_norm_W_i_after_j": prod_after,
        "prod_norm_W_i_except_j": prod_others,
        "norm_x_j_minus_1_median": x_prev,
        "norm_x_median": x_in,
        "lemma_3_4_eq30": eq30,
        "lemma_3_4_eq32": eq32,
        "chain_formulas_apply": runner.chain,
    }}


GUMBEL_NOTE = (
    "Gumbel-masks paper, Lemma 3.4, for a compositional chain x -> sigma(W_i x + b_i) with L-Lipschitz sigma: "
    "eq. (30) = L^(d-j) prod_(i>j) ||W_i|| ||dW_j|| ||x_(j-1)|| with the measured layer input, eq. (32) = "
    "L^d ||dW_j|| ||x|| prod_(i!=j) ||W_i|| (needs b_i = 0). ||.|| are operator norms of the layers on their "
    "input tensors (guaranteed bounds for convolutions); the _inf quantities are the max-row-sum norms of the "
    "GEMM matrices used in Lemmas 3.3 and 3.6. Other ops (pooling, ...) are assumed L-Lipschitz. With residual "
    "or branching paths (chain_formulas_apply = false) the chain formulas do NOT bound the model; use "
    "'contribution' and 'downstream_gain', which follow the real graph.")
