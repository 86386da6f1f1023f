"""Per-sample Taylor-model bounds on the sparse-minus-dense difference, node by node.

:mod:`sparsecompile.analysis.certify` bounds ``||v_s - v_d||_2`` with one
number per sample and per-op gains (operator norms, global Lipschitz
constants). Such bounds multiply along the depth, and a product of two
activations (squeeze-excite gating ``x * hardsigmoid(.)``) squares them: on
real models they are 1e100 times the real change. This module keeps instead,
per sample and per ELEMENT of every activation, a first-order part and a
rigorous remainder:

    v_s - v_d  in  c_v + [-r_v, r_v]        (elementwise; c_v a vector, r_v >= 0)

* ``c_v`` (the centre) is the first-order Taylor term: the Jacobian of the
  network at the sample's dense activations applied to what each changed
  layer introduces. At a node whose parameters changed, the introduced error
  ``u = g(a_d; theta_s) - g(a_d; theta_d)`` is evaluated exactly (the sparse
  node run on the dense inputs, as in certify) and added to ``c``.
* ``r_v`` (the radius) bounds everything the linearisation leaves out, with
  local rules around the dense value ``d`` of each input, on the interval the
  input difference is known to lie in (``[c - r, c + r]``):

  - linear and affine ops (conv incl. depthwise/grouped, linear, matmul,
    BatchNorm in eval mode, pooling averages, views, pads, cat, split, add,
    multiplication/division by constants): ``c' = J c`` exactly (forward-mode
    JVP, float64) and ``r' = |J| r`` (the same op with the absolute values of
    its constant coefficients);
  - elementwise ``sigma``: ``sigma(d + t) - sigma(d) = s t + rho(t)`` with
    ``s = sigma'(d)`` and ``|rho| <= w`` on the interval: for piecewise
    linear ops (ReLU, ReLU6, hardtanh, clamp, leaky ReLU, hard-sigmoid, abs)
    ``w`` is the exact maximum of ``|rho|`` over the interval's ends and the
    kinks inside it (0 where the interval does not cross a kink: exact
    there); for hard-swish ``(max |sigma' - s| on the interval) * max|t|``;
    for smooth ops ``min(K m^2 / 2, (slope range) m)`` with ``K`` a bound on
    ``|sigma''|``; other activations ``s = 0, w = L m`` (their Lipschitz
    constant). Then ``c' = s c``, ``r' = |s| r + w``, intersected with what
    the op's value range allows (a hard-sigmoid output moves by at most
    ``[0 - sigma(d), 1 - sigma(d)]``) and with the box of the linear
    relaxations of :func:`sparsecompile.analysis.crown.unary_relaxation`
    (``alpha t + [beta_l, beta_h]`` with the chord or tangent slope: the
    offsets' midpoint moves the centre, so a point box maps to a point box,
    e.g. a ReLU that flips is exact, not a remainder);
  - a product of two activations ``x y``:
    ``dx y_d + x_d dy + dx dy``; the cross term lies in ``[p_lo, p_hi]``
    (the extreme products of the two boxes' ends), so
    ``c' = y_d c_x + x_d c_y + (p_lo + p_hi) / 2`` and
    ``r' = |y_d| r_x + |x_d| r_y + (p_hi - p_lo) / 2``: the gate's
    bound is its own interval, capped by its range, never a squared norm;
  - max pooling / amax: ``max(d + t) - max(d) - t_am`` lies in
    ``[0, max(d + hi) - (max d + lo_am)]`` where ``am`` is the dense argmax
    (the JVP picks it): exact when the dense argmax wins by more than the
    interval widths; intersected with ``[max(d + lo), max(d + hi)] - max(d)``
    (max is nondecreasing in every input; exact on a point box);
  - softmax / log-softmax over an axis: ``p_i`` grows with ``z_i`` and falls
    with every other ``z_j``, so the extreme corners of the box bound it;
  - any other op (LayerNorm, ops without a rule): ``c' = 0`` and
    every element bounded by the op's l2 gain (certify's rule) times the l2
    norm of its inputs' boxes; infinite where certify has no rule.

  Every box is also intersected with certify's own per-sample l2 bound on
  the node (``|dv_i| <= ||dv||_2 <= delta``), so this is never looser.

Soundness: by induction over the graph, each input difference lies in its
box, each rule's remainder bound holds on that box, so the output difference
lies in the output box (in exact arithmetic; float32 rounding of the two
model executions is covered by the same slack as in certify). The centre is
NOT the sparse run: it is the first-order propagation through the dense
network; every nonlinear effect (a ReLU that may switch, the cross term of a
product) is paid for in ``r``. At the output a sample is certified when
``z_i - z_j > (c_j - c_i) + r_i + r_j`` for its dense top-1 class ``i`` and
every other ``j``, which is sound because ``dz_j - dz_i <= c_j - c_i + r_j + r_i``.

Why not auto_LiRPA: its only published release on the package index
(auto-lirpa 0.3, 2022) requires ``torch < 1.13``; this project runs torch
2.x. It also bounds perturbations of the network *input* on an
``nn.Module`` traced through its own parser, while certification needs
perturbations injected at many inner nodes (every changed layer) of the
``torch.fx`` graph the build produces, with the sparse parameters. The
rules here are the CROWN/DeepPoly-style local relaxations, specialised to
"first-order term + box remainder" in a single forward pass (forward-mode
JVPs), which costs two float64 runs of each changed-downstream layer.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx.node import map_aggregate

aten = torch.ops.aten

# (c, r) of a node: None means the node's value is identical in both models (no difference at all).
Box = tuple  # (center: Tensor float64, radius: Tensor float64)

# Piecewise-linear elementwise ops: kinks as a function of the node's literal arguments.
def _kinks_relu(args):
    return [0.0]


def _kinks_clamp(args, lo_index=1, hi_index=2, lo_default=None, hi_default=None):
    lo = args[lo_index] if len(args) > lo_index else lo_default
    hi = args[hi_index] if len(args) > hi_index else hi_default
    return [float(v) for v in (lo, hi) if isinstance(v, (int, float))]


_PIECEWISE_LINEAR = {
    aten.relu.default: _kinks_relu, aten.relu_.default: _kinks_relu,
    aten.relu6.default: lambda a: [0.0, 6.0],
    aten.hardtanh.default: lambda a: _kinks_clamp(a, 1, 2, -1.0, 1.0),
    aten.hardtanh_.default: lambda a: _kinks_clamp(a, 1, 2, -1.0, 1.0),
    aten.clamp.default: _kinks_clamp, aten.clamp_.default: _kinks_clamp,
    aten.clip.default: _kinks_clamp,
    aten.clamp_min.default: lambda a: _kinks_clamp(a, 1, 99), aten.clamp_max.default: lambda a: _kinks_clamp(a, 99, 1),
    aten.leaky_relu.default: _kinks_relu, aten.leaky_relu_.default: _kinks_relu,
    aten.hardsigmoid.default: lambda a: [-3.0, 3.0], aten.hardsigmoid_.default: lambda a: [-3.0, 3.0],
    aten.abs.default: _kinks_relu,
}

# Smooth ops: (K >= max |sigma''|, slope range [lo, hi] over the reals).
_SMOOTH = {
    aten.sigmoid.default: (0.0963, 0.0, 0.25), aten.sigmoid_.default: (0.0963, 0.0, 0.25),
    aten.tanh.default: (0.7699, 0.0, 1.0), aten.tanh_.default: (0.7699, 0.0, 1.0),
    aten.silu.default: (0.5001, -0.0999, 1.0999), aten.silu_.default: (0.5001, -0.0999, 1.0999),
    aten.softplus.default: (0.2501, 0.0, 1.0),
    aten.sin.default: (1.0, -1.0, 1.0), aten.cos.default: (1.0, -1.0, 1.0),
    aten.atan.default: (0.6496, 0.0, 1.0),
    aten.erf.default: (0.9680, 0.0, 1.1284),
    # mish: max |mish''| = 0.6442, mish' in [-0.11253, 1.08850] (float64 on a 3e-5 grid over [-60, 60]; both tend
    # to 0 / (0, 1) beyond), rounded outward
    aten.mish.default: (0.6500, -0.1130, 1.0890),
}
# gelu: exact form K = 2 phi(0) = 0.7979, slope in [-0.1290, 1.1290]; the tanh form is within 1e-3 of it.
_GELU = (0.8100, -0.1300, 1.1300)

_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int}

# Value ranges of ops whose outputs are bounded: the difference is within [lo - sigma(d), hi - sigma(d)].
def _range_of(target, args):
    if target in (aten.sigmoid.default, aten.sigmoid_.default, aten.hardsigmoid.default, aten.hardsigmoid_.default):
        return 0.0, 1.0
    if target in (aten.tanh.default, aten.tanh_.default):
        return -1.0, 1.0
    if target in (aten.relu.default, aten.relu_.default, aten.abs.default):
        return 0.0, math.inf
    if target == aten.relu6.default:
        return 0.0, 6.0
    if target in (aten.hardtanh.default, aten.hardtanh_.default):
        lo, hi = (args[1] if len(args) > 1 else -1.0), (args[2] if len(args) > 2 else 1.0)
        return float(lo), float(hi)
    if target in (aten.clamp.default, aten.clamp_.default, aten.clip.default):
        lo = args[1] if len(args) > 1 and isinstance(args[1], (int, float)) else -math.inf
        hi = args[2] if len(args) > 2 and isinstance(args[2], (int, float)) else math.inf
        return float(lo), float(hi)
    return None


def _to64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double()
    return value


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t, nan=math.inf, posinf=math.inf, neginf=math.inf)


def _zeros_like_shape(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(t.shape, dtype=torch.float64)


# Rounding allowance of a few float64 operations, relative to the magnitudes involved (~20 ulps).
_ULPS = 2e-15


def intersect(c: torch.Tensor, r: torch.Tensor, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
    """The box c +- r intersected with [lo, hi] (tensors or floats broadcastable to c), as a new c +- r."""
    low = torch.maximum(c - r, torch.as_tensor(lo, dtype=torch.float64)) if lo is not None else c - r
    high = torch.minimum(c + r, torch.as_tensor(hi, dtype=torch.float64)) if hi is not None else c + r
    low = torch.where(torch.isnan(low), c - r, low)
    high = torch.where(torch.isnan(high), c + r, high)
    # an empty intersection is impossible in exact arithmetic (both sets hold the true difference);
    # under rounding keep the larger box
    empty = low > high
    low, high = torch.where(empty, c - r, low), torch.where(empty, c + r, high)
    # where neither bound cuts the box it is kept exactly as it came (no rounding to pay for: every rounding
    # allowance would be multiplied by |W| downstream, layer after layer)
    cut = (low > c - r) | (high < c + r)
    center = (low + high) / 2
    radius = (high - low) / 2
    kept = torch.where(torch.isfinite(r), c.abs() + r, torch.zeros_like(r))  # fl(c -+ r) where a side is kept
    radius = radius + _ULPS * (low.abs() + high.abs() + kept)  # and the rounding of the two lines above
    center, radius = torch.where(cut, center, c), torch.where(cut, radius, r)
    bad = ~torch.isfinite(center)
    if bool(bad.any()):
        center = torch.where(bad, torch.zeros_like(center), center)
        radius = torch.where(bad, torch.full_like(radius, math.inf), radius)
    return center, radius


class TaylorModel:
    """The per-node boxes of one batch (see the module docstring); driven by certify's runner."""

    def __init__(self, runner):
        self.runner = runner
        self.boxes: dict[str, object] = {}
        self.relaxations: dict[str, tuple] = {}  # node -> (input box, unary_relaxation result), this node only
        self.violations = 0
        self.worst = 0.0
        self.worst_node = None

    # -- helpers -------------------------------------------------------------------------------------
    def box(self, node) -> Box | None:
        return self.boxes.get(node.name) if isinstance(node, torch.fx.Node) else None

    def _dense64(self, node):
        return _to64(self.runner.dense_env[node.name])

    def _acts(self, node) -> list[torch.fx.Node]:
        found = []
        map_aggregate((node.args, node.kwargs),
                      lambda a: found.append(a) if self.runner.is_tensor_activation(a) else None)
        return found

    def _function(self, node, acts, absolute: bool = False):
        """The op as a function of its activation inputs (float64), other arguments as the sparse model has
        them (with ``absolute``: the absolute value of every constant tensor and multiplier)."""
        runner = self.runner
        names = [a.name for a in acts]
        scalar_mul = node.target in (aten.mul.Scalar, aten.mul.Tensor, aten.div.Scalar, aten.div.Tensor)

        def lookup_const(a):
            value = _to64(runner.cross_value(a))
            if absolute and isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.abs()
            return value

        def fn(*tensors):
            replace = dict(zip(names, tensors))

            def lookup(a):
                if isinstance(a, torch.fx.Node):
                    return replace[a.name] if a.name in replace else lookup_const(a)
                if absolute and scalar_mul and isinstance(a, float):
                    return abs(a)
                return a
            args, kwargs = map_aggregate((node.args, node.kwargs), lookup)
            if absolute:
                if scalar_mul and len(args) > 1 and isinstance(args[1], (int, float)) and not isinstance(args[1], bool):
                    args = (args[0], abs(args[1])) + tuple(args[2:])
                kwargs = {k: (abs(v) if k in ("alpha", "beta") and isinstance(v, (int, float)) else v)
                          for k, v in kwargs.items()}
            return node.target(*args, **kwargs)
        return fn

    def _jvp(self, node, acts, tangents, absolute=False):
        fn = self._function(node, acts, absolute)
        primals = tuple(self._dense64(a) for a in acts)
        _, out = torch.func.jvp(fn, primals, tuple(tangents))
        return out

    # -- one node ------------------------------------------------------------------------------------
    def getitem(self, node) -> None:
        parent = self.boxes.get(node.args[0].name)
        self.boxes[node.name] = parent[node.args[1]] if isinstance(parent, list) else None

    def placeholder(self, name: str) -> None:
        self.boxes[name] = None

    def run(self, node, v_dense, tuple_out: bool, per_output_gains, local_vectors, unbounded_marker,
            l2_bounds, actual) -> None:
        """Set the node's box(es). ``local_vectors``: per output, the exact introduced error (or None);
        ``l2_bounds``: per output, certify's per-sample l2 bound (or None); ``actual``: per output, the
        observed sparse - dense difference (float64), only for the self-check."""
        from sparsecompile.analysis.certify import (_GEMM_LIKE, _IDENTITY, _MAX_POOL, _ADAPTIVE_MAX_POOL,
                                                    _NONNEG_LINEAR, _SPLITS, _UNARY)
        target = node.target
        acts = self._acts(node)
        outs = list(v_dense) if tuple_out else [v_dense]
        in_boxes = [self.box(a) for a in acts]
        changed = any(u is not None for u in local_vectors)
        if all(b is None for b in in_boxes) and not changed:
            self.boxes[node.name] = [None] * len(outs) if tuple_out else None
            return
        boxes: list = [None] * len(outs)
        linear = (target in _GEMM_LIKE or target in _NONNEG_LINEAR or target in _SPLITS
                  or target in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar,
                                aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.cat.default,
                                aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default)
                  or (target in (aten.mul.Tensor, aten.mul.Scalar) and len(acts) == 1))
        try:
            if all(b is None for b in in_boxes):
                boxes = [None] * len(outs)
            elif target in _IDENTITY and len(acts) == 1:
                boxes = [in_boxes[0]]
            elif linear:
                boxes = self._linear(node, acts, in_boxes, tuple_out)
            elif target in _UNARY and len(acts) == 1:
                boxes = [self._unary(node, acts[0], in_boxes[0])]
            elif target in (aten.mul.Tensor,) and len(acts) == 2:
                boxes = [self._product(node, acts, in_boxes, outs[0])]
            elif target in _MAX_POOL or target in _ADAPTIVE_MAX_POOL or target in (aten.amax.default, aten.max.dim):
                boxes = self._max_like(node, acts[0], in_boxes[0], tuple_out, len(outs))
            elif target in _SOFTMAX and len(acts) == 1 and node.args[0] is acts[0] and not tuple_out:
                opaque = self._opaque(acts, in_boxes, per_output_gains, outs, unbounded_marker)[0]
                boxes = [self._softmax(node, acts[0], in_boxes[0], opaque)]
            else:
                boxes = self._opaque(acts, in_boxes, per_output_gains, outs, unbounded_marker)
        except Exception:  # noqa: BLE001 - a rule that cannot run here falls back to the l2 box (sound)
            boxes = self._opaque(acts, in_boxes, per_output_gains, outs, unbounded_marker)
        result = []
        for k, t in enumerate(outs):
            b = boxes[k] if k < len(boxes) else None
            u = local_vectors[k] if k < len(local_vectors) else None
            gains = per_output_gains[k] if k < len(per_output_gains) else None
            if (not isinstance(t, torch.Tensor) or not t.is_floating_point() or gains is None or t.dim() == 0
                    or t.numel() == 0):
                result.append(None)  # not an activation that consumers may use (e.g. saved statistics)
                continue
            if u is not None:
                if b is None:
                    b = (u.clone(), torch.zeros_like(u))
                else:
                    b = (b[0] + u, b[1])
            if b is not None:
                c, r = b[0].reshape(t.shape), _finite(b[1].reshape(t.shape).abs())
                delta = l2_bounds[k] if k < len(l2_bounds) else None
                if delta is not None:
                    d = delta.reshape(-1, *([1] * (t.dim() - 1))).to(torch.float64)
                    if bool(torch.isfinite(d).any()):
                        c, r = intersect(c, r, -d, d)
                b = (c, r)
                self._check(node, t, b, actual[k] if k < len(actual) else None)
            result.append(b)
        self.boxes[node.name] = result if tuple_out else result[0]

    def _check(self, node, dense, box, actual) -> None:
        """Self-check against the observed execution: the difference must lie in the box (up to float32)."""
        if actual is None:
            return
        c, r = box
        n = dense.shape[0]
        keep = self.runner.keep
        scale = dense.detach().double().reshape(n, -1).abs().amax(1).reshape(-1, *([1] * (dense.dim() - 1)))
        from sparsecompile.analysis.certify import CHECK_ATOL, CHECK_RTOL
        excess = (actual - c).abs() - r * (1 + CHECK_RTOL) - CHECK_ATOL * (1 + scale) - CHECK_RTOL * c.abs()
        excess = excess[:keep]
        if excess.numel() == 0:
            return
        worst = float(excess.max())
        self.violations += int((excess.reshape(excess.shape[0], -1) > 0).any(1).sum())
        if worst > self.worst:
            self.worst, self.worst_node = worst, node.name

    # -- rules ---------------------------------------------------------------------------------------
    def _tangents(self, acts, in_boxes, which: int):
        out = []
        for a, b in zip(acts, in_boxes):
            value = self.runner.dense_env[a.name]
            out.append(b[which] if b is not None else torch.zeros(value.shape, dtype=torch.float64))
        return out

    def _linear(self, node, acts, in_boxes, tuple_out):
        target = node.target
        centers = self._jvp(node, acts, self._tangents(acts, in_boxes, 0))
        radii_in = self._tangents(acts, in_boxes, 1)
        if target in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar):
            # |J| r for a +- alpha b: r_a + |alpha| r_b, broadcast
            alpha = abs(float(node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)))
            total = None
            for a, r in zip(acts, radii_in):
                first = a is node.args[0]
                factor = (alpha if target == aten.rsub.Scalar else 1.0) if first else alpha
                term = r * factor
                total = term if total is None else total + term
            radii = total.expand(centers.shape) if total.shape != centers.shape else total
        elif target == aten.cat.default:
            radii = self._jvp(node, acts, radii_in)  # copies
        else:
            radii = self._jvp(node, acts, radii_in, absolute=True)
        if tuple_out:
            cs, rs = list(centers), list(radii)
            return [(c, _finite(r)) if isinstance(c, torch.Tensor) and c.is_floating_point() else None
                    for c, r in zip(cs, rs)]
        return [(centers, _finite(radii))]

    def _unary(self, node, act, box):
        from sparsecompile.analysis.certify import _UNARY
        target = node.target
        d = self._dense64(act)
        c, r = box
        lo, hi = c - r, c + r
        m = torch.maximum(lo.abs(), hi.abs())
        extra = tuple(_to64(a) for a in node.args[1:])
        kwargs = dict(node.kwargs)
        op = _out_of_place(target)  # never modify d in place

        def sigma(x):
            return op(x, *extra, **kwargs)

        _, s = torch.func.jvp(sigma, (d,), (torch.ones_like(d),))
        s = torch.nan_to_num(s, nan=0.0)
        if target in _PIECEWISE_LINEAR:
            base = sigma(d)
            points = [lo, hi]
            for k in _PIECEWISE_LINEAR[target](node.args):
                points.append(torch.minimum(torch.maximum(torch.full_like(d, k) - d, lo), hi))
            w = torch.zeros_like(d)
            for t in points:
                rho = sigma(d + t) - base - s * t
                w = torch.maximum(w, rho.abs())
            # rounding of the float64 evaluation (values, not differences): a generous ulp margin
            w = w + 1e-12 * (1 + d.abs() + m)
        elif target in (aten.hardswish.default, aten.hardswish_.default):
            # sigma' = 0 (x < -3), (2x + 3) / 6 (-3 < x < 3), 1 (x > 3): range from the ends and kink limits
            def slope(x):
                return torch.where(x < -3, torch.zeros_like(x), torch.where(x > 3, torch.ones_like(x), (2 * x + 3) / 6))
            # rho(t) integrates sigma' - s over [d, d + t]: the slope range over the hull of d and the interval
            a, b = d + lo.clamp_max(0), d + hi.clamp_min(0)
            smin = torch.minimum(slope(a), slope(b))
            smax = torch.maximum(slope(a), slope(b))
            for kink, lefts in ((-3.0, (0.0, -0.5)), (3.0, (1.5, 1.0))):
                inside = (a <= kink) & (b >= kink)
                for v in lefts:
                    smin = torch.where(inside, torch.minimum(smin, torch.full_like(smin, v)), smin)
                    smax = torch.where(inside, torch.maximum(smax, torch.full_like(smax, v)), smax)
            w = torch.maximum((s - smin).abs(), (smax - s).abs()) * m * (1 + 1e-9)
        elif target in _SMOOTH or target in (aten.gelu.default, aten.gelu_.default):
            k2, slo, shi = _SMOOTH.get(target, _GELU)
            w = torch.minimum(k2 * m * m / 2, torch.maximum((s - slo).abs(), (shi - s).abs()) * m) * (1 + 1e-9)
        else:  # no local rule: |sigma(d + t) - sigma(d)| <= L |t|
            lip = _UNARY[target]
            lip = lip(_LiteralCtx(node)) if callable(lip) else lip
            s = torch.zeros_like(d)
            w = lip * m
        center = s * c
        radius = s.abs() * r + w
        # the chord / tangent linear relaxations (analysis/crown.py): y = alpha t + [beta_l, beta_h] gives the
        # box alpha c +- |alpha| r + [beta_l, beta_h]; keep the tighter slope per element, intersect (both hold)
        from sparsecompile.analysis.crown import unary_relaxation
        relax = unary_relaxation(node, d, box)
        self.relaxations[getattr(node, "name", None)] = (box, relax)  # reused by the margin back-substitution
        if relax is not None:
            candidates, finite, _ = relax
            best_lo = best_hi = None
            for alpha, b_lo, b_hi in candidates:
                lo_k = alpha * c - alpha.abs() * r + b_lo
                hi_k = alpha * c + alpha.abs() * r + b_hi
                size = (alpha * c).abs() + alpha.abs() * r
                lo_k = lo_k - _ULPS * (size + b_lo.abs())
                hi_k = hi_k + _ULPS * (size + b_hi.abs())
                best_lo = lo_k if best_lo is None else torch.maximum(best_lo, lo_k)
                best_hi = hi_k if best_hi is None else torch.minimum(best_hi, hi_k)
            inf = torch.full_like(d, math.inf)
            best_lo = torch.where(finite, best_lo, -inf)
            best_hi = torch.where(finite, best_hi, inf)
            center, radius = intersect(center, _finite(radius), best_lo, best_hi)
        value_range = _range_of(target, node.args)
        if value_range is not None:
            base = sigma(d)
            lo_r, hi_r = value_range
            center, radius = intersect(center, _finite(radius), lo_r - base if math.isfinite(lo_r) else None,
                                       hi_r - base if math.isfinite(hi_r) else None)
        return center, radius

    def _product(self, node, acts, in_boxes, out):
        x, y = acts if acts[0] is node.args[0] else acts[::-1]
        bx, by = self.box(x), self.box(y)
        xd, yd = self._dense64(x), self._dense64(y)
        cx, rx = bx if bx is not None else (torch.zeros_like(xd), torch.zeros_like(xd))
        cy, ry = by if by is not None else (torch.zeros_like(yd), torch.zeros_like(yd))
        # the cross term dx dy lies between the products of the boxes' ends: its midpoint moves the centre,
        # its half-width is the remainder (exact when both boxes are points)
        lx, hx, ly, hy = cx - rx, cx + rx, cy - ry, cy + ry
        corners = torch.stack(torch.broadcast_tensors(lx * ly, lx * hy, hx * ly, hx * hy))
        low, high = corners.amin(0), corners.amax(0)
        mid, half = (low + high) / 2, (high - low) / 2
        half = half + _ULPS * (low.abs() + high.abs())
        center = yd * cx + xd * cy + mid
        radius = yd.abs() * rx + xd.abs() * ry + half
        radius = radius + _ULPS * ((yd * cx).abs() + (xd * cy).abs() + mid.abs())  # rounding of the centre's sum
        bad = ~torch.isfinite(center)
        center = torch.where(bad, torch.zeros_like(center), center)
        radius = torch.where(bad, torch.full_like(radius, math.inf), radius)
        return center.expand(out.shape), _finite(radius).expand(out.shape)

    def _max_like(self, node, act, box, tuple_out, count):
        fn = self._function(node, [act])
        d = self._dense64(act)
        c, r = box
        lo, hi = c - r, c + r

        def first(v):
            return v[0] if isinstance(v, (tuple, list)) else v
        with torch.no_grad():
            top = first(fn(d))
            top_hi = first(fn(d + hi))
        _, c_am = torch.func.jvp(lambda z: first(fn(z)), (d,), (c,))
        _, r_am = torch.func.jvp(lambda z: first(fn(z)), (d,), (r,))
        # max(d + t) - max(d) - t_am in [0, R], R = max(d + hi) - (max d + lo_am), lo_am = c_am - r_am
        big = (top_hi - top - c_am + r_am).clamp_min(0)
        box_out = (c_am + big / 2, _finite(r_am + big / 2))
        # max is nondecreasing in every input: max(d + t) - max(d) lies in [max(d + lo), max(d + hi)] - max(d)
        # (exact for a point box, also where the argmax switches)
        with torch.no_grad():
            top_lo = first(fn(d + lo))
        slack = 1e-12 * (top.abs() + top_lo.abs() + top_hi.abs() + 1)
        box_out = intersect(box_out[0], box_out[1], top_lo - top - slack, top_hi - top + slack)
        return [box_out] + [None] * (count - 1) if tuple_out else [box_out]

    def _softmax(self, node, act, box, opaque):
        """softmax_i grows with z_i and falls with every other z_j, so over the box
        ``p_i in [e^lo_i / (e^lo_i + sum_j!=i e^hi_j), e^hi_i / (e^hi_i + sum_j!=i e^lo_j)]``; intersected with
        the l2-gain box (log-softmax: the logarithms)."""
        d = self._dense64(act)
        c, r = box
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(dim, int) or opaque is None:
            return opaque
        lo, hi = d + c - r, d + c + r
        if not bool((torch.isfinite(lo) & torch.isfinite(hi)).all()):
            return opaque
        shift = hi.amax(dim, keepdim=True)
        e_lo, e_hi = torch.exp(lo - shift), torch.exp(hi - shift)
        s_lo, s_hi = e_lo.sum(dim, keepdim=True), e_hi.sum(dim, keepdim=True)
        count = d.shape[dim]
        tol = 4e-16 * (count + 2)
        others_hi = (s_hi - e_hi) + tol * s_hi  # an upper bound on sum_j!=i e^hi_j despite cancellation
        others_lo = ((s_lo - e_lo) - tol * s_lo).clamp_min(0)
        p_min = e_lo / (e_lo + others_hi) * (1 - tol)
        p_max = (e_hi / (e_hi + others_lo) * (1 + tol)).clamp_max(1.0)
        p_min, p_max = torch.nan_to_num(p_min, nan=0.0), torch.nan_to_num(p_max, nan=1.0)
        base = torch.softmax(d, dim)
        if node.target in (aten._log_softmax.default, aten.log_softmax.int):
            low, high = torch.log(p_min) - torch.log(base), torch.log(p_max) - torch.log(base)
        else:
            low, high = p_min - base, p_max - base
        slack = 1e-12 * (1 + low.abs() + high.abs())
        low = torch.nan_to_num(low - slack, nan=-math.inf)
        high = torch.nan_to_num(high + slack, nan=math.inf)
        return intersect(opaque[0], opaque[1], low, high)

    def _opaque(self, acts, in_boxes, per_output_gains, outs, unbounded_marker):
        """No local rule: every element within the op's l2 gain times the l2 norm of its input boxes."""
        boxes = []
        for k, t in enumerate(outs):
            gains = per_output_gains[k] if k < len(per_output_gains) else None
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or gains is None:
                boxes.append(None)
                continue
            n = t.shape[0]
            if gains is unbounded_marker:
                moved = any(b is not None for b in in_boxes)
                boxes.append((torch.zeros(t.shape, dtype=torch.float64),
                              torch.full(t.shape, math.inf if moved else 0.0, dtype=torch.float64)))
                continue
            total = torch.zeros(n, dtype=torch.float64)
            for a, gain in gains:
                b = self.box(a)
                if b is None:
                    continue
                norm = (b[0].abs() + b[1]).reshape(n, -1).norm(dim=1)
                g = torch.as_tensor(gain, dtype=torch.float64).reshape(-1)
                total = total + torch.where(norm == 0, torch.zeros_like(norm), _finite(g * norm))
            radius = total.reshape(n, *([1] * (t.dim() - 1))).expand(t.shape).clone()
            boxes.append((torch.zeros(t.shape, dtype=torch.float64), radius))
        return boxes


def _out_of_place(target):
    name = target._schema.name.split("::")[-1]
    if name.endswith("_"):
        packet = getattr(aten, name[:-1], None)
        if packet is not None and target._overloadname in packet.overloads():
            return getattr(packet, target._overloadname)
    return target


class _LiteralCtx:
    """The part of certify's rule context that the Lipschitz-constant helpers read (literal arguments)."""

    def __init__(self, node):
        self.node = node

    def literal(self, index, name, default=None):
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default)


def output_certificate(box: Box, z_dense: torch.Tensor, slack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(certified, l2 bound) per sample from the output box of a [N, C] output."""
    c, r = box
    z = z_dense.detach().double()
    n = z.shape[0]
    top = z.argmax(1)
    upper = c + r  # dz_j <= c_j + r_j
    lower_top = (c - r).gather(1, top[:, None])  # dz_i >= c_i - r_i
    gap = z.gather(1, top[:, None]) - z  # z_i - z_j >= 0
    need = upper - lower_top  # dz_j - dz_i <= need_j
    ok = gap > need + slack.reshape(n, 1)
    ok.scatter_(1, top[:, None], True)
    certified = ok.all(1) & torch.isfinite(r).all(1)
    bound = (c.abs() + r).reshape(n, -1).norm(dim=1)
    return certified, bound
