"""Back-substituted (CROWN-style) linear bounds on each class margin's change.

:mod:`sparsecompile.analysis.taylor` keeps, per node and element, a box
``c +- r`` around the sparse-minus-dense difference ``Delta v = v_s - v_d``.
Its radius is carried forward through a linear layer as ``|W| r``: every
element's uncertainty is charged with the absolute value of every weight,
and that grows ~3-10x per layer, so the output boxes certify nothing on deep
networks. This module bounds instead, per sample, the change of each class
margin ``Delta z_i - Delta z_j`` (``i`` the dense top-1 class) *symbolically*,
going backward from the output as CROWN / DeepPoly do, so that positive and
negative contributions of a linear layer cancel.

The unknowns and what is known about them
-----------------------------------------
For a node ``v = g(a; theta)`` (``theta_s`` in the sparse graph, ``theta_d``
in the dense one) the difference splits exactly as in certify:

    Delta v = [g(a_d + Delta a; theta_s) - g(a_d; theta_s)]  +  u_v,
    u_v = g(a_d; theta_s) - g(a_d; theta_d)   (the local term, computed exactly: sparse node on dense inputs)

The first bracket depends on the op:

* affine in its activation inputs (conv incl. depthwise/grouped/transposed,
  linear, addmm/mm/matmul with one activation operand, eval BatchNorm,
  add/sub, multiplication/division by a constant, cat, split, views,
  reshapes, pads, slices, average pooling, means, sums, upsampling, ...):
  ``J_s Delta a`` EXACTLY, ``J_s`` the linear part of the SPARSE op (the
  actual pruned/corrected layer). Going backward, a coefficient tensor
  ``Lambda_v`` becomes ``J_s^T Lambda_v`` -- a vector-Jacobian product
  through the real op (``torch.func.vjp``, batched over the margins with
  ``torch.func.vmap``); no matrix is materialised and no ``|W|`` appears.
* elementwise ``sigma`` (ReLU, ReLU6, hardtanh/clamp, leaky ReLU,
  hard-sigmoid, abs, hard-swish, SiLU, GELU, sigmoid, tanh, ...), with input
  difference ``t = Delta p`` in the Taylor box ``[l, h]`` of the input:
  two lines around the OBSERVED DENSE value ``d``,

      alpha_L t + beta_L  <=  sigma(d + t) - sigma(d)  <=  alpha_U t + beta_U   on [l, h].

  Candidate slopes are the tangent at the dense point ``sigma'(d)`` (exact
  where the interval does not cross a kink) and the chord/midpoint slope
  (the tightest upper line of a convex piece, e.g. the triangle relaxation of
  a crossing ReLU); per element the line closer to the function at the box
  centre is kept. Offsets: for piecewise linear ops the exact extremes of
  ``sigma(d + t) - sigma(d) - alpha t`` over the ends and the kinks inside the
  interval; for hard-swish also its stationary point (piecewise quadratic);
  for smooth ops (SiLU, GELU, sigmoid, tanh, softplus, erf, ...) the
  remainder around the midpoint ``m``: ``|sigma(d+t) - sigma(d+m) - alpha(t-m)|
  <= min(K rho^2 / 2, max|sigma' - alpha| rho)``, ``rho = (h - l) / 2``, ``K >=
  max|sigma''|``. Backward: ``Lambda_p = Lambda^+ alpha_L + Lambda^- alpha_U``,
  constant ``+= Lambda^+ beta_L + Lambda^- beta_U``.
* product of two activations (squeeze-excite gating):
  ``x_s y_s - x_d y_d = y_d Delta x + x_d Delta y + Delta x Delta y``, the
  first two exact (a VJP of the product at the dense values), the cross
  term bounded elementwise by the corners of the two Taylor boxes.
* max pooling / adaptive max pooling / amax: ``max(d + t) - max(d) = t_am +
  e`` with ``am`` the dense argmax (the VJP of the op at the dense value
  routes to it) and ``0 <= e <= max(d + h) - max(d) - l_am``.
* anything else (softmax, LayerNorm, ops with activation-dependent
  constants, ops without any rule): *concretised* with the node's own Taylor
  box: ``Lambda . Delta v >= Lambda . c - |Lambda| . r`` (the box already holds
  ``u_v``); the back-substitution does not continue through it. This is the
  sound fallback: it can never be looser than the box, and an infinite box
  (an op certify has no rule for) gives an infinite bound, never a wrong one.

At the output ``z`` (``[N, C]``) the coefficient for margin ``j`` is
``e_i - e_j``. Summing, in reverse topological order, every node's
``Lambda_v . u_v`` and relaxation offsets gives per sample and class ``j`` a
number ``L_j`` with ``Delta z_i - Delta z_j >= L_j``. The prediction is kept
if ``z_i - z_j + L_j > slack`` for every ``j != i`` (``slack`` is certify's
float32 allowance plus a 1e-9 relative allowance for the float64 sums
here).

Soundness: each relation above holds for the true differences (the local
terms exactly, the relaxations on the Taylor boxes, which certify checks
against the observed execution), and the back-substitution only adds
nonnegative multiples of valid inequalities; so ``L_j`` is a valid lower
bound in exact arithmetic. Everything runs in float64.

Cost: one backward sweep per batch over the nodes between the changed layers
and the output, each a VJP of the op batched over the ``C`` margins (a
few backward passes of the model), plus the relaxation coefficients
(stored per element of the activations' inputs during certify's forward
pass).

Why not auto_LiRPA: not installable here (its only published release,
auto-lirpa 0.3, pins ``torch < 1.13``; this project runs torch 2.x, and no
newer build is in the offline package lists), and it bounds perturbations of
the network *input* on an ``nn.Module`` it traces with its own parser,
whereas these certificates need exact perturbations injected at many inner
nodes of the ``torch.fx`` graph the build produces (every changed layer),
with the sparse parameters on the backward path. The relaxations here are
the standard CROWN ones (triangle/chord and tangent lines; interval
concretisation elsewhere) applied to that setting; intermediate bounds are
the Taylor boxes (no intermediate back-substitution yet).
"""

from __future__ import annotations

import math

import torch
from torch.fx.node import map_aggregate

from sparsecompile.analysis.taylor import _GELU, _PIECEWISE_LINEAR, _SMOOTH, _SOFTMAX, _out_of_place, _to64

aten = torch.ops.aten

_HARDSWISH = {aten.hardswish.default, getattr(getattr(aten, "hardswish_", None), "default", None)} - {None}
# relative allowance for float64 rounding of the relaxation offsets (values of size |d| + |t|): ~100 ulps, for
# a few operations and library functions (exp, tanh, erf) accurate to a few ulps
_ROUND = 1e-14


def has_relaxation(target) -> bool:
    return (target in _PIECEWISE_LINEAR or target in _HARDSWISH or target in _SMOOTH
            or target in (aten.gelu.default, aten.gelu_.default))


def unary_relaxation(node, d: torch.Tensor, box):
    """Linear bounds of ``g(t) = sigma(d + t) - sigma(d)`` for ``t`` in the box ``c +- r`` (float64, per element).

    Returns ``(candidates, finite, sigma(d))`` with ``candidates`` a list of ``(alpha, beta_low, beta_high)``,
    each meaning ``alpha t + beta_low <= g(t) <= alpha t + beta_high`` wherever the box is finite (``finite``),
    or None for an op without a rule. Candidate slopes: the tangent at the dense point and the chord (piecewise
    linear / hard-swish: offsets are the exact extremes over the ends, kinks and stationary points) or the
    midpoint tangent (smooth ops: offsets from the second-derivative and slope-range bounds)."""
    target = node.target
    if not has_relaxation(target) or any(isinstance(a, torch.fx.Node) for a in list(node.args[1:])
                                         + list(node.kwargs.values())):
        return None
    c, r = box
    lo, hi = c - r, c + r
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    zero = torch.zeros_like(d)
    lo = torch.where(finite, lo, zero)
    hi = torch.where(finite, hi, zero)
    extra = tuple(_to64(a) for a in node.args[1:])
    kwargs = dict(node.kwargs)
    op = _out_of_place(target)

    def sigma(x):
        return op(x, *extra, **kwargs)

    base = sigma(d)

    def g(t):
        return sigma(d + t) - base

    def slope_at(x):
        _, s = torch.func.jvp(sigma, (x,), (torch.ones_like(x),))
        return torch.nan_to_num(s, nan=0.0)

    tangent = slope_at(d)
    width = hi - lo
    mid = (lo + hi) / 2
    scale = d.abs() + lo.abs() + hi.abs() + base.abs()
    candidates = []
    if target in _PIECEWISE_LINEAR or target in _HARDSWISH:
        hardswish = target in _HARDSWISH
        g_lo, g_hi = g(lo), g(hi)
        chord = torch.where(width > 1e-12 * scale, (g_hi - g_lo) / torch.where(width > 0, width, 1.0), tangent)
        kinks = [-3.0, 3.0] if hardswish else _PIECEWISE_LINEAR[target](node.args)
        for alpha in (tangent, chord):
            points = [lo, hi] + [torch.minimum(torch.maximum(k - d, lo), hi) for k in kinks]
            if hardswish:  # stationary point of x (x + 3) / 6 - alpha x on the middle piece
                points.append(torch.minimum(torch.maximum(3 * alpha - 1.5 - d, lo), hi))
            values = torch.stack([g(t) - alpha * t for t in points])
            eps = _ROUND * scale * (1 + alpha.abs())
            candidates.append((alpha, values.amin(0) - eps, values.amax(0) + eps))
    else:
        k2, slo, shi = _SMOOTH.get(target, _GELU)
        rho = width / 2
        alpha = slope_at(d + mid)
        centre = g(mid) - alpha * mid
        err = torch.minimum(k2 * rho * rho / 2,
                            torch.maximum((alpha - slo).abs(), (shi - alpha).abs()) * rho) * (1 + 1e-9)
        eps = _ROUND * scale * (1 + alpha.abs())
        candidates.append((alpha, centre - err - eps, centre + err + eps))
        m = torch.maximum(lo.abs(), hi.abs())  # the tangent at the dense point, remainder as in taylor.py
        err = torch.minimum(k2 * m * m / 2,
                            torch.maximum((tangent - slo).abs(), (shi - tangent).abs()) * m) * (1 + 1e-9)
        eps = _ROUND * scale * (1 + tangent.abs())
        candidates.append((tangent, -err - eps, err + eps))
    return candidates, finite, base


class _Slot:
    """Placeholder for the i-th activation argument in a bound op."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _dot(lam: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum over every axis but (margin, sample) of lam * value; 0 * inf counts 0."""
    k, n = lam.shape[0], lam.shape[1]
    value = value.expand(lam.shape[1:]) if value.shape != lam.shape[1:] else value
    flat = value.reshape(n, -1)
    if bool(torch.isfinite(flat).all()):
        return torch.einsum("knd,nd->kn", lam.reshape(k, n, -1), flat)
    prod = torch.where(lam == 0, torch.zeros((), dtype=torch.float64), lam * value.unsqueeze(0))
    return prod.reshape(k, n, -1).sum(-1)


def _lower_of(lam: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """min over v in [low, high] of lam . v, per (margin, sample)."""
    if bool(torch.isfinite(low).all()) and bool(torch.isfinite(high).all()):
        return _dot(lam, (low + high) / 2) - _dot(lam.abs(), (high - low) / 2) * (1 + 1e-12)
    pos, neg = lam.clamp_min(0), lam.clamp_max(0)
    return _dot(pos, low) + _dot(neg, high)


def _absdot(lam: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _dot(lam.abs(), value.abs())


class CrownModel:
    """What the backward sweep needs, recorded node by node during certify's forward pass (one batch)."""

    def __init__(self, runner):
        self.runner = runner
        self.records: dict[str, tuple] = {}
        self.locals: dict[str, list] = {}
        self.concretised: dict[str, str] = {}  # node -> why (for the report)
        self.failures: dict[str, str] = {}
        self.softmax_inputs: dict[str, tuple] = {}  # softmax node -> (its input, that input's dense value)
        self.local_terms: dict[str, torch.Tensor] = {}  # changed node -> [margin, sample] Lambda . u

    # -- forward: recording -------------------------------------------------------------------------
    def _acts(self, node) -> tuple[list[torch.fx.Node], int]:
        """The distinct activation operands, and how many activation operands there are in all."""
        found: list = []
        uses = 0

        def visit(a):
            nonlocal uses
            if self.runner.is_tensor_activation(a):
                uses += 1
                if all(a is not b for b in found):
                    found.append(a)
        map_aggregate((node.args, node.kwargs), visit)
        return found, uses

    def _bind(self, node, acts):
        """The op as a float64 function of its activation inputs; every other argument fixed now (sparse
        parameters, shape values), so the function outlives the forward pass's environment."""
        names = [a.name for a in acts]
        runner = self.runner
        op = _out_of_place(node.target) if isinstance(node.target, torch._ops.OpOverload) else node.target

        def resolve(a):
            if isinstance(a, torch.fx.Node):
                if a.name in names:
                    return _Slot(names.index(a.name))
                return _to64(runner.cross_value(a))
            return a
        args, kwargs = map_aggregate((node.args, node.kwargs), resolve)

        def fn(*tensors):
            def fill(a):
                return tensors[a.index] if isinstance(a, _Slot) else a
            a2, k2 = map_aggregate((args, kwargs), fill)
            return op(*a2, **k2)
        return fn

    def getitem(self, node) -> None:
        self.records[node.name] = ("getitem", node.args[0].name, node.args[1])

    def record(self, node, v_dense, tuple_out: bool, local_vectors) -> None:
        """Called after the Taylor boxes of ``node`` are set (its inputs' boxes are still there)."""
        from sparsecompile.analysis.certify import (_ADAPTIVE_MAX_POOL, _GEMM_LIKE, _IDENTITY, _MAX_POOL,
                                                    _NONNEG_LINEAR, _SPLITS, _UNARY)
        taylor = self.runner.taylor
        own = taylor.boxes.get(node.name)
        own_list = own if isinstance(own, list) else [own]
        if all(b is None for b in own_list):
            return  # no difference at all (or not an activation consumers can use)
        if any(u is not None for u in local_vectors):
            self.locals[node.name] = list(local_vectors)
        acts, uses = self._acts(node)
        in_boxes = [taylor.box(a) for a in acts]
        target = node.target
        outs = list(v_dense) if tuple_out else [v_dense]
        if all(b is None for b in in_boxes):
            self.records[node.name] = ("leaf",)
            return
        try:
            single = len(acts) == 1 and uses == 1  # x * x is not linear in x
            first_is_act = single and bool(node.args) and node.args[0] is acts[0]
            if target in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar,
                          aten.cat.default, aten.neg.default):
                kind = "linear"  # linear in every activation operand
            elif single and (target in _GEMM_LIKE or target in _NONNEG_LINEAR or target in _SPLITS
                             or target in (aten.mul.Tensor, aten.mul.Scalar)):
                kind = "linear"  # (multi)linear ops with one activation operand
            elif first_is_act and target in (aten._native_batch_norm_legit_no_training.default,
                                             aten.batch_norm.default, aten.div.Tensor, aten.div.Scalar):
                kind = "linear"  # affine in the input / numerator
            else:
                kind = None
            if kind == "linear":
                fn = (lambda x: x) if target in _IDENTITY else self._bind(node, acts)
                shapes = [tuple(self.runner.dense_env[a.name].shape) for a in acts]
                floats = [k for k, t in enumerate(outs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
                self.records[node.name] = ("linear", fn, [a.name for a in acts], shapes, tuple_out, floats)
                return
            if single and target in _UNARY and not tuple_out and not any(
                    isinstance(a, torch.fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
                relax = self._relax_unary(node, acts[0], in_boxes[0])
                if relax is not None:
                    self.records[node.name] = ("unary", acts[0].name) + relax
                    return
            if target == aten.mul.Tensor and len(acts) == 2 and not tuple_out:
                self.records[node.name] = self._product(node, acts, in_boxes)
                return
            if single and first_is_act and (target in _MAX_POOL or target in _ADAPTIVE_MAX_POOL
                                            or target in (aten.amax.default, aten.max.dim)):
                self.records[node.name] = self._max_like(node, acts[0], in_boxes[0], tuple_out)
                return
        except Exception as exc:  # noqa: BLE001 - a rule that cannot run here falls back to the box (sound)
            self.failures.setdefault(node.name, f"{type(exc).__name__}: {str(exc)[:120]}")
        if target in _SOFTMAX and len(acts) == 1 and node.args[0] is acts[0] and not tuple_out:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            logits = self.runner.dense_env[acts[0].name]
            if isinstance(dim, int) and logits.dim() == 2 and dim in (1, -1):
                self.softmax_inputs[node.name] = (acts[0].name, _to64(logits))
        self.concretised.setdefault(node.name, str(target))
        self.records[node.name] = ("box", own_list, tuple_out)

    def fallback(self, node, why: str) -> None:
        """Stop the back-substitution at ``node``: bound its contribution by its Taylor box."""
        own = self.runner.taylor.boxes.get(node.name)
        own_list = own if isinstance(own, list) else [own]
        self.failures.setdefault(node.name, why)
        if all(b is None for b in own_list):
            self.records.pop(node.name, None)
            return
        self.concretised.setdefault(node.name, str(node.target))
        self.records[node.name] = ("box", own_list, isinstance(own, list))

    # -- relaxations -------------------------------------------------------------------------------
    def _relax_unary(self, node, act, box):
        cached = self.runner.taylor.relaxations.pop(node.name, None)
        if cached is not None and cached[0] is box:
            relax = cached[1]
        else:
            relax = unary_relaxation(node, _to64(self.runner.dense_env[act.name]), box)
        if relax is None:
            return None
        candidates, finite, base = relax
        c = box[0]
        # per element: the lower line highest at the box centre, the upper line lowest there
        a_l, b_l = candidates[0][0], candidates[0][1]
        a_u, b_u = candidates[0][0], candidates[0][2]
        for alpha, low, high in candidates[1:]:
            better_low = alpha * c + low > a_l * c + b_l
            a_l, b_l = torch.where(better_low, alpha, a_l), torch.where(better_low, low, b_l)
            better_high = alpha * c + high < a_u * c + b_u
            a_u, b_u = torch.where(better_high, alpha, a_u), torch.where(better_high, high, b_u)
        # an unbounded input: only the op's value range (if any) bounds the change
        if not bool(finite.all()):
            from sparsecompile.analysis.taylor import _range_of
            value_range = _range_of(node.target, node.args)
            lo_v, hi_v = value_range if value_range is not None else (-math.inf, math.inf)
            inf = torch.full_like(base, math.inf)
            zero = torch.zeros_like(base)
            a_l, a_u = torch.where(finite, a_l, zero), torch.where(finite, a_u, zero)
            b_l = torch.where(finite, b_l, (lo_v - base) if math.isfinite(lo_v) else -inf)
            b_u = torch.where(finite, b_u, (hi_v - base) if math.isfinite(hi_v) else inf)
        return a_l, b_l, a_u, b_u

    def _product(self, node, acts, in_boxes):
        x, y = acts
        xd, yd = _to64(self.runner.dense_env[x.name]), _to64(self.runner.dense_env[y.name])
        bx = in_boxes[0] if in_boxes[0] is not None else (torch.zeros_like(xd), torch.zeros_like(xd))
        by = in_boxes[1] if in_boxes[1] is not None else (torch.zeros_like(yd), torch.zeros_like(yd))
        lx, hx = bx[0] - bx[1], bx[0] + bx[1]
        ly, hy = by[0] - by[1], by[0] + by[1]
        corners = torch.stack(torch.broadcast_tensors(lx * ly, lx * hy, hx * ly, hx * hy))
        corners = torch.nan_to_num(corners, nan=math.inf)  # 0 * inf: unknown
        low, high = corners.amin(0), corners.amax(0)
        low = torch.where(torch.isnan(low), torch.full_like(low, -math.inf), low)
        scale = _ROUND * (low.abs() + high.abs())
        return ("product", [x.name, y.name], xd, yd, low - scale, high + scale)

    def _max_like(self, node, act, box, tuple_out):
        fn = self._bind(node, [act])

        def first(v):
            return v[0] if isinstance(v, (tuple, list)) else v
        d = _to64(self.runner.dense_env[act.name])
        c, r = box
        lo, hi = c - r, c + r
        top = first(fn(d))
        top_hi = first(fn(d + hi))
        _, vjp_fn = torch.func.vjp(lambda z: first(fn(z)), d)
        _, lo_am = torch.func.jvp(lambda z: first(fn(z)), (d,), (lo,))
        excess = (top_hi - top - lo_am)
        excess = torch.nan_to_num(excess, nan=math.inf).clamp_min(0)
        excess = excess + _ROUND * (1 + top.abs() + top_hi.abs() + lo_am.abs())
        # or, max being nondecreasing in every input, the constant bounds [max(d + lo), max(d + hi)] - max(d):
        # kept per element where they are narrower than the argmax line's excess (e.g. a point box)
        top_lo = first(fn(d + lo))
        rounding = _ROUND * (1 + top.abs() + top_lo.abs() + top_hi.abs())
        mono_lo = torch.nan_to_num(top_lo - top, nan=-math.inf) - rounding
        mono_hi = torch.nan_to_num(top_hi - top, nan=math.inf) + rounding
        constant = (mono_hi - mono_lo) <= excess
        return ("max", act.name, vjp_fn, excess, tuple_out, constant, mono_lo, mono_hi)

    # -- backward sweep ----------------------------------------------------------------------------
    def start(self, out_name: str, z_dense: torch.Tensor):
        """Where the margins are bounded: the output itself, or, when the output is (a view of) a softmax /
        log-softmax over its class axis, the logits (same top-1 class, same order of classes). Returns the
        node's name and its dense value."""
        from sparsecompile.analysis.certify import _IDENTITY, _NONNEG_LINEAR
        by_name = self.by_name()
        name, value = out_name, z_dense
        for _ in range(8):
            node = by_name.get(name)
            rec = self.records.get(name)
            if node is None or rec is None:
                break
            if rec[0] == "linear" and (node.target in _IDENTITY or node.target in _NONNEG_LINEAR) \
                    and len(rec[2]) == 1 and tuple(rec[3][0]) == tuple(z_dense.shape) and \
                    node.target not in (torch.ops.aten.flip.default, torch.ops.aten.roll.default):
                name = rec[2][0]  # a view/copy with the same [N, C] shape: same elements in the same order
                continue
            if name in self.softmax_inputs:
                source, dense_logits = self.softmax_inputs[name]
                if tuple(dense_logits.shape) == tuple(z_dense.shape):
                    return source, dense_logits
            break
        return out_name, z_dense.detach().double()

    def by_name(self) -> dict:
        if not hasattr(self, "_by_name"):
            self._by_name = {node.name: node for node in self.runner.sparse_nodes}
        return self._by_name

    def margins(self, out_name: str, z_dense: torch.Tensor, box=None, slack=None):
        """Per sample (rows) and class j (columns): a lower bound on dr_top - dr_j, the sum of the magnitudes
        of the terms (for the rounding allowance), and the dense reference r these margins are of: the
        output ``z`` or, behind a softmax, its logits (see :meth:`start`); ``top`` is the dense top-1 of z.

        With the output's elementwise ``box`` (and the margin test's ``slack``), class pairs the box already
        certifies on every sample of the batch are not back-substituted (their bound is the box's,
        ``(c_top - r_top) - (c_j + r_j)``), except each sample's closest pair, kept for the per-layer
        attribution; elsewhere the larger of the two lower bounds is used."""
        top = z_dense.detach().double().argmax(1)
        start, z_ref = self.start(out_name, z_dense)
        n, classes = z_ref.shape
        columns = torch.arange(classes)
        box_lower = None
        if start == out_name and box is not None and slack is not None:
            c, r = (b.reshape(n, classes) for b in box)
            if bool(torch.isfinite(c).all()) and bool(torch.isfinite(r).all()):
                box_lower = (c - r).gather(1, top[:, None]) - (c + r)
                box_lower = box_lower - 1e-12 * ((c.abs() + r).gather(1, top[:, None]) + c.abs() + r)
                margin = certified_margins(box_lower, z_ref, top)
                needed = (margin <= slack.reshape(n, 1)).any(0)
                needed[margin.argmin(1)] = True
                columns = needed.nonzero()[:, 0]
        lower_part, magnitude_part = self._margins(start, z_ref, top, columns)
        if box_lower is None:
            return lower_part, magnitude_part, z_ref, start
        lower = box_lower.clone()
        magnitude = (box_lower.abs() + 1).clone()
        if len(columns):
            lower[:, columns] = torch.maximum(lower_part, box_lower[:, columns])
            magnitude[:, columns] = torch.maximum(magnitude_part, magnitude[:, columns])
        return lower, magnitude, z_ref, start

    def _margins(self, out_name: str, z_dense: torch.Tensor, top: torch.Tensor, columns: torch.Tensor):
        runner = self.runner
        n, classes = z_dense.shape
        count = len(columns)
        spec = torch.zeros(count, n, classes, dtype=torch.float64)
        spec[:, torch.arange(n), top] += 1.0
        spec[torch.arange(count), :, columns] -= 1.0
        const = torch.zeros(count, n, dtype=torch.float64)
        magnitude = torch.zeros(count, n, dtype=torch.float64)
        self.local_terms = {}

        def full(rows: torch.Tensor) -> torch.Tensor:  # [count, n] -> [classes, n], zeros elsewhere
            out = torch.zeros(classes, n, dtype=torch.float64)
            out[columns] = rows
            return out
        if out_name not in self.records or count == 0:
            # unchanged output (no record: no difference), or only a local term
            if out_name in self.locals and count:
                u = self.locals[out_name][0]
                self.local_terms = {out_name: full(_dot(spec, u))}
                return _dot(spec, u).t(), _absdot(spec, u).t()
            return const.t(), magnitude.t()
        lams: dict[str, object] = {out_name: spec}

        def add(name, value, position=None, count=None):
            if position is None:
                lams[name] = value if name not in lams else lams[name] + value
                return
            holder = lams.setdefault(name, [None] * count)
            holder[position] = value if holder[position] is None else holder[position] + value

        counts = {}
        for name, rec in self.records.items():
            if rec[0] == "getitem":
                counts[rec[1]] = max(counts.get(rec[1], 0), rec[2] + 1 if isinstance(rec[2], int) else 0)
        self.contributions = {}

        def step(node, lam):
            nonlocal const, magnitude
            rec = self.records.get(node.name)
            if rec is None:
                return  # no difference at this node
            kind = rec[0]
            if kind == "getitem":
                source, position = rec[1], rec[2]
                if source in self.records and isinstance(position, int):
                    out_count = max(counts.get(source, 0), position + 1)
                    add(source, lam, position, out_count)
                return
            lam_list = lam if isinstance(lam, list) else [lam]
            if kind == "box":
                for k, box in enumerate(rec[1]):
                    if k < len(lam_list) and lam_list[k] is not None and box is not None:
                        c, r = box
                        const += _lower_of(lam_list[k], c - r, c + r)
                        magnitude += _absdot(lam_list[k], c.abs() + r)
                return
            for k, u in enumerate(self.locals.get(node.name, [])):
                if u is not None and k < len(lam_list) and lam_list[k] is not None:
                    term = _dot(lam_list[k], u)
                    const += term
                    magnitude += _absdot(lam_list[k], u)
                    self.local_terms[node.name] = self.local_terms.get(node.name, 0) + term
            if kind == "leaf":
                return
            if kind == "linear":
                _, fn, names, shapes, tuple_out, floats = rec
                selected = [k for k in floats if k < len(lam_list) and lam_list[k] is not None]
                if not selected:
                    return
                grads = self._vjp_linear(fn, shapes, tuple_out, selected, [lam_list[k] for k in selected])
                for name, grad in zip(names, grads):
                    if grad is not None:
                        add(name, grad)
            elif kind == "unary":
                _, name, a_l, b_l, a_u, b_u = rec
                pos, neg = lam.clamp_min(0), lam.clamp_max(0)
                add(name, pos * a_l + neg * a_u)
                const += _dot(pos, b_l) + _dot(neg, b_u)
                magnitude += _absdot(pos, b_l) + _absdot(neg, b_u)
            elif kind == "product":
                _, names, xd, yd, low, high = rec
                _, vjp_fn = torch.func.vjp(torch.mul, xd, yd)
                gx, gy = _batched(vjp_fn, lam)
                add(names[0], gx)
                add(names[1], gy)
                const += _lower_of(lam, low, high)
                magnitude += _absdot(lam, low.abs() + high.abs())
            elif kind == "max":
                _, name, vjp_fn, excess, tuple_out, constant, mono_lo, mono_hi = rec
                first = lam_list[0]
                if first is None:
                    return
                line = torch.where(constant, torch.zeros((), dtype=torch.float64), first)
                flat = first - line
                (grad,) = _batched(vjp_fn, line)
                add(name, grad)
                const += _lower_of(line, torch.zeros_like(excess), excess) + _lower_of(flat, mono_lo, mono_hi)
                magnitude += _absdot(line, excess) + _absdot(flat, mono_lo.abs() + mono_hi.abs())

        for node in reversed(runner.sparse_nodes):
            lam = lams.pop(node.name, None)
            if lam is None:
                continue
            before = const.clone()
            step(node, lam)
            moved = const - before
            if bool((moved != 0).any()):
                self.contributions[node.name] = moved
        const = torch.nan_to_num(const, nan=-math.inf)
        self.local_terms = {name: full(term) for name, term in self.local_terms.items()}
        return const.t(), magnitude.t()

    def _vjp_linear(self, fn, shapes, tuple_out, selected, lams):
        primals = tuple(torch.zeros(s, dtype=torch.float64) for s in shapes)

        def picked(*tensors):
            out = fn(*tensors)
            outs = list(out) if tuple_out else [out]
            return tuple(outs[k] for k in selected)
        _, vjp_fn = torch.func.vjp(picked, *primals)
        return _batched(vjp_fn, tuple(lams))


def _batched(vjp_fn, cotangent):
    """vjp_fn applied to each margin's cotangent (axis 0), vmapped, with a loop as the fallback."""
    try:
        return torch.func.vmap(vjp_fn)(cotangent)
    except Exception:  # noqa: BLE001 - an op without a batching rule: one margin at a time
        k = (cotangent[0] if isinstance(cotangent, tuple) else cotangent).shape[0]
        parts = [vjp_fn(tuple(c[i] for c in cotangent) if isinstance(cotangent, tuple) else cotangent[i])
                 for i in range(k)]
        return tuple(torch.stack([p[j] for p in parts]) for j in range(len(parts[0])))


def certified_margins(lower: torch.Tensor, z_ref: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Per sample and class j: the smallest margin r_top - r_j the sparse model can have (+inf at j = top)."""
    z = z_ref.detach().double()
    gap = z.gather(1, top[:, None]) - z + lower
    gap.scatter_(1, top[:, None], math.inf)
    return gap


def crown_certificate(lower: torch.Tensor, magnitude: torch.Tensor, z_ref: torch.Tensor, top: torch.Tensor,
                      slack: torch.Tensor) -> torch.Tensor:
    """Per sample: True when r_top - r_j + lower_j > slack (+ rounding allowance) for every j != top."""
    n = z_ref.shape[0]
    ok = certified_margins(lower, z_ref, top) > slack.reshape(n, 1) + 1e-9 * magnitude
    return ok.all(1) & torch.isfinite(lower).all(1)
