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

Where the code lives
--------------------
* ``bounds.py`` -- operator-norm arithmetic: guaranteed spectral norms of
  matrices and convolutions (:func:`matrix_norm_bound`,
  :func:`conv_operator_norm_bound`) and the power-iteration lower estimate.
* ``rules.py`` -- the per-op gain rules (activation Lipschitz constants,
  Schur test, add/mul/div, pooling, norms, GEMMs ...), the op sets they key on,
  the ``_RULES`` registry, :func:`modelled_ops` and :class:`NotCertifiable`.
* ``interpreter.py`` -- ``_Certifier``: the two-stream (dense and sparse)
  graph walk that runs every node on both models, propagates the per-sample
  bound columns and drives the Taylor boxes and CROWN records; the
  calibration batching (:func:`static_batch_size`).
* ``report.py`` -- :func:`certify`: runs the batches, applies the margin
  certificates and builds the summary, the risky-layer table, the margin
  ranking and the Gumbel-paper quantities.
"""

from sparsecompile.analysis.certify.bounds import (
    MAX_FFT_ELEMENTS, NORM_SAFETY, conv_operator_norm_bound, matrix_norm_bound, power_iteration_norm,
)
from sparsecompile.analysis.certify.interpreter import CHECK_ATOL, CHECK_RTOL, static_batch_size
from sparsecompile.analysis.certify.report import FP_SLACK, GUMBEL_NOTE, SQRT2, certify
from sparsecompile.analysis.certify.rules import NotCertifiable, modelled_ops
# private names other modules import from here: the op sets taylor.py and crown.py dispatch on, and tests
from sparsecompile.analysis.certify.rules import (  # noqa: F401
    _ADAPTIVE_MAX_POOL, _GEMM_LIKE, _IDENTITY, _MAX_POOL, _NONNEG_LINEAR, _SPLITS, _UNARY, _window_multiplicity,
)

__all__ = [
    "CHECK_ATOL", "CHECK_RTOL", "FP_SLACK", "GUMBEL_NOTE", "MAX_FFT_ELEMENTS", "NORM_SAFETY", "NotCertifiable",
    "SQRT2", "certify", "conv_operator_norm_bound", "matrix_norm_bound", "modelled_ops", "power_iteration_norm",
    "static_batch_size",
]
