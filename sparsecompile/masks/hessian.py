"""Second-order masks from the calibration Hessian of the layer input.

For one output row ``w`` of a layer's GEMM weight (``gemm_matrix``:
``[outputs, K]``, groups of M along K) and calibration inputs ``X`` (``[S, K]``), removing the entries
``d = w * (1 - mask)`` changes the row's outputs by ``d X^T``, so the squared
output error is ``d^T H d`` with ``H = X^T X / S`` (the layer-wise Hessian,
up to a factor 2).

Against the dense output (sequential calibration, the default)
    With upstream layers already sparse the layer sees inputs ``x`` where the
    dense model had ``x_ref``. The error that matters is against the *dense*
    output, ``e = w.x_ref - (w - d).x = w.(x_ref - x) + d.x``, so
    ``E[e^2] = const + 2 d.(C w) + d^T H d`` with ``C = E[x (x_ref - x)^T]``
    (``InputStatistics.upstream_linear``, accumulated as W C^T; centered when a correction follows).
    The linear term lets a mask cancel part of the upstream error instead of
    only minimising its own. SparseGPT's objective is the case ``C = 0``.
    Measured (``benchmarks/results/hessian_dense_target.md``): the hessian + bias drop on the four
    Fashion CNNs went from -0.71 to -0.47 pt.

Weights kept as they are (default)
    Minimise ``d^T H d`` (plus the linear term above) over N:M masks, row by row, all rows at once:
    start from the diagonal estimate (drop the entries with the smallest
    ``w_j^2 H_jj``), then block-coordinate descent over the groups: for each
    group try every N-of-M pattern with the other groups fixed and keep the
    best. Every step is exact for its group, so the error never increases.

``--update-weights`` (SparseGPT / optimal brain surgeon)
    Process columns left to right in blocks; at the start of each group
    choose the N entries to keep by the OBS saliency ``w_j^2 / [H^-1]_jj``,
    then compensate the removed weights' effect on the not-yet-processed
    columns with ``w -= (w_j / [H^-1]_jj) * H^-1[j, :]`` (through the
    Cholesky factor of ``H^-1``). ``H`` is damped by ``damp * mean(diag H)``.
    Surviving weights change; the N:M pattern is exact.

Groups follow the reduction axis of the stored weight: for a convolution,
M consecutive input channels at one kernel position (TensorRT's layout), not
the flattened ``cin*kh*kw`` axis, and ``H`` comes from inputs unfolded with
the convolution's real padding, stride and dilation.
"""

from __future__ import annotations

import itertools

import torch

from sparsecompile.errors import SparseCompileError

from sparsecompile.masks.base import MaskContext, MaskMethod, topn_mask
from sparsecompile.masks.statistics import from_gemm_matrix, gemm_matrix

MAX_PATTERNS = 70  # C(8,4); larger M only gets the diagonal estimate


def _hessian(context: MaskContext) -> torch.Tensor:
    stats = context.statistics
    if stats is None or stats.gram is None:
        raise ValueError("the hessian method needs the calibration Hessian")
    return stats.hessian(centered=bool(context.options.get("centered")))


def _row_errors(w: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, linear: torch.Tensor | None = None) -> torch.Tensor:
    removed = w * ~keep
    error = ((removed @ h) * removed).sum(1)
    return error if linear is None else error + 2 * (removed * linear).sum(1)


def min_output_error_mask(matrix: torch.Tensor, hessian: torch.Tensor, n: int, m: int, sweeps: int = 3,
                          linear: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask ``[rows, K]`` (N of each M along K) minimising ``sum_rows d^T H d (+ 2 d.linear_row)``.

    ``linear`` (``[rows, K]``, row r ``C w_r``) is the upstream-error term of the module docstring.
    Coordinate descent can stop in a local optimum, so it starts from three
    masks -- the diagonal estimate, magnitude, and the OBS (SparseGPT) mask --
    plus, with ``linear``, the diagonal estimate of the full objective, and
    keeps, row by row, the best result. The starts descend together, stacked
    as extra rows (each start's result is the one it would reach alone).
    """
    w = matrix.double()
    h = hessian.double()
    starts = [topn_mask(w * w * torch.diagonal(h)[None, :], 1, n, m), topn_mask(w.abs(), 1, n, m)]
    try:
        starts.append(obs_prune(w, h, n, m)[0])
    except RuntimeError:  # Cholesky failure on a degenerate Hessian: the other starts suffice
        pass
    linear = linear.double() if linear is not None else None
    if linear is not None:  # the diagonal estimate of the full objective: pruning w_j alone costs w_j^2 H_jj + 2 w_j c_j
        starts.append(topn_mask(w * w * torch.diagonal(h)[None, :] + 2 * w * linear, 1, n, m))
    best, best_error = None, None
    for keep in _coordinate_descent_starts(w, h, starts, n, m, sweeps, linear):
        error = _row_errors(w, keep, h, linear)
        if best is None:
            best, best_error = keep, error
        else:
            better = error < best_error
            best[better] = keep[better]
            best_error = torch.minimum(error, best_error)
    return best


# Groups whose gradient updates stay inside the block during a sweep; the rest of the
# gradient is brought up to date with one product per block (SparseGPT's lazy batch update).
BLOCK_GROUPS = 32


def _coordinate_descent_starts(w, h, starts, n, m, sweeps, linear=None):
    """Block-coordinate descent over the groups from each start mask; one result per start.

    Gauss-Seidel over the groups, left to right, all rows (of all starts) at once: for group
    ``g`` and each N-of-M pattern ``p`` (removal indicator ``r_p``), the objective changes by
    ``(w_g r_p)^T H_gg (w_g r_p) + 2 (w_g r_p).o_g`` with ``o_g = (H d)_g - H_gg d_g (+ linear_g)``,
    the other groups' pull. The quadratic part does not depend on the mask, so it is computed
    once for every group; ``H d`` is kept current inside a block of groups and refreshed for the
    other columns at the end of the block. The first lowest pattern wins (as ``argmin``); a
    start stops when a sweep moves none of its rows. Where a group has zero weights a pattern
    change can remove the same values: like a lone descent, such a row takes the new pattern
    only when some row of its start moved in that group.
    """
    patterns = list(itertools.combinations(range(m), n))
    if len(patterns) > MAX_PATTERNS or sweeps <= 0:
        return [keep.clone() for keep in starts]
    rows, k = w.shape
    groups = k // m
    count = len(starts)
    keep_patterns = torch.zeros(len(patterns), m, dtype=torch.float64)
    for index, pattern in enumerate(patterns):
        keep_patterns[index, list(pattern)] = 1.0
    drop = 1.0 - keep_patterns  # [P, m]
    drop_t = drop.T.contiguous()
    # the pattern index of every group of every start ([count * rows, groups])
    code_of = {int(sum(1 << i for i in pattern)): index for index, pattern in enumerate(patterns)}
    lookup = torch.full((1 << m,), -1, dtype=torch.long)
    for code, index in code_of.items():
        lookup[code] = index
    bits = 1 << torch.arange(m)
    choice = torch.cat([lookup[(keep.reshape(rows, groups, m).long() * bits).sum(-1)] for keep in starts])
    if bool((choice < 0).any()):
        raise ValueError(f"a start mask is not {n}:{m}")
    stacked = w.repeat(count, 1)  # [count * rows, K]
    fixed = linear.repeat(count, 1) if linear is not None else None
    removed = stacked * drop[choice].reshape(count * rows, k)
    gradient = removed @ h  # [count * rows, K]: (H d) for every row
    h_blocks = h.reshape(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [groups, m, m]: H_gg
    grouped = w.reshape(rows, groups, m)
    pairs = (grouped[:, :, :, None] * h_blocks[None] * grouped[:, :, None, :]).reshape(rows, groups, m * m)
    quadratic = pairs @ (drop[:, :, None] * drop[:, None, :]).reshape(-1, m * m).T  # [rows, groups, P]
    quadratic = quadratic.repeat(count, 1, 1)  # [count * rows, groups, P]
    careful = bool((w == 0).any())  # equal removed values under two patterns are possible
    for _ in range(sweeps):
        before = choice.clone()
        moved_starts = torch.zeros(count, dtype=torch.bool)
        for first in range(0, groups, BLOCK_GROUPS):
            last = min(first + BLOCK_GROUPS, groups)
            lo, hi = first * m, last * m
            h_rows = h[lo:hi, lo:hi]
            block_removed = removed[:, lo:hi]  # views: updated in place
            block_gradient = gradient[:, lo:hi]
            block_weights = stacked[:, lo:hi]
            start_removed = block_removed.clone()
            for g in range(first, last):
                a, b = (g - first) * m, (g - first + 1) * m
                old = block_removed[:, a:b]
                others = block_gradient[:, a:b] - old @ h_blocks[g]
                if fixed is not None:
                    others += fixed[:, g * m:(g + 1) * m]
                weights = block_weights[:, a:b]
                energy = torch.addmm(quadratic[:, g], weights * others, drop_t, alpha=2.0)
                best = energy.argmin(1)
                new = weights * drop[best]
                delta = new - old
                block_gradient.addmm_(delta, h_rows[a:b])
                if careful:
                    moved = (delta != 0).any(1).reshape(count, rows).any(1)
                    moved_starts |= moved
                    best = torch.where(moved.repeat_interleave(rows), best, choice[:, g])
                old.copy_(new)
                choice[:, g] = best
            change = block_removed - start_removed
            if lo > 0:
                gradient[:, :lo].addmm_(change, h[lo:hi, :lo])
            if hi < k:
                gradient[:, hi:].addmm_(change, h[lo:hi, hi:])
        if not careful:  # without zero weights, a row moves exactly when its pattern changes
            moved_starts = (choice != before).reshape(count, -1).any(1)
        if not bool(moved_starts.any()):
            break
    keep = keep_patterns[choice].bool().reshape(count, rows, k)
    return list(keep.unbind(0))


def _cholesky_damped(h: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of ``h``, adding more diagonal damping while it is not positive definite.

    A Hessian from calibration statistics is positive semi-definite in exact arithmetic, but a centered
    one of nearly constant inputs, summed in float32, can come out slightly indefinite (measured: a
    page-orientation CNN's layer failed at the default 1% damping). Each retry adds 10x more of the
    mean diagonal, up to 100x it; the damping only regularises the weight update.
    """
    factor, info = torch.linalg.cholesky_ex(h)
    scale = float(torch.diagonal(h).abs().mean()) or 1.0
    extra = 0.01
    while int(info) != 0 and extra <= 100.0:
        factor, info = torch.linalg.cholesky_ex(h + extra * scale * torch.eye(h.shape[0], dtype=h.dtype))
        extra *= 10.0
    if int(info) != 0:
        raise SparseCompileError("the calibration Hessian is not positive definite even with heavy damping "
                                 "(non-finite or degenerate calibration statistics)")
    return factor


# Column block of the triangular inverse: each block solves only its trailing rows.
INVERSE_BLOCK = 512


def _lower_triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """``L^-1`` of a lower-triangular ``L``, a block of columns at a time.

    Column block ``[j0, j1)`` of ``L^-1`` is zero above row ``j0`` and solves
    ``L[j0:, j0:] X = I[j0:, j0:j1]`` below it, so no work is spent on the zero upper part:
    about ``k^3 / 6`` multiply-adds where one solve against the whole identity takes ``k^3 / 2``
    (CREPE's conv2, k = 8192). Each column is the same triangular solve either way.
    """
    k = lower.shape[0]
    inverse = torch.zeros_like(lower)
    for start in range(0, k, INVERSE_BLOCK):
        stop = min(start + INVERSE_BLOCK, k)
        identity = torch.eye(k - start, stop - start, dtype=lower.dtype)
        inverse[start:, start:stop] = torch.linalg.solve_triangular(lower[start:, start:], identity, upper=False)
    return inverse


def obs_prune(matrix: torch.Tensor, hessian: torch.Tensor, n: int, m: int, damp: float = 0.01,
              block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT-style N:M pruning with weight compensation: (keep-mask, updated weights).

    Columns are processed a group at a time: the group's N kept entries are chosen by the OBS
    saliency, then its removed entries' errors ``e`` solve the column-by-column recurrence
    ``e_c = [c removed] / U_cc * (w_c - sum_{c' < c in group} e_c' U_c'c)`` (``U_gg`` strictly
    upper triangular, so ``m - 1`` substitutions are exact) and update the later columns at once.
    """
    w = matrix.double().clone()
    h = hessian.double().clone()
    rows, k = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    # The upper Cholesky factor of H^-1 (H^-1 = U^T U) from one factorisation: with J the reversal,
    # J H J = L L^T gives H^-1 = (J L^-T J)(J L^-1 J), and U = J L^-1 J is upper triangular.
    flipped = _cholesky_damped(h.flip(0, 1))
    u = _lower_triangular_inverse(flipped).flip(0, 1)
    keep = torch.ones(rows, k, dtype=torch.bool)
    block = max(m, block - block % m)
    diagonal = torch.diagonal(u)
    for start in range(0, k, block):
        stop = min(start + block, k)
        w_block = w[:, start:stop].clone()
        u_block = u[start:stop, start:stop]
        errors = torch.zeros_like(w_block)
        for i in range(0, stop - start, m):
            j = i + m
            u_diag = diagonal[start + i:start + j]
            values = w_block[:, i:j]
            saliency = values ** 2 / u_diag[None, :] ** 2
            order = torch.sort(saliency, dim=1, descending=True, stable=True).indices[:, :n]  # as topn_mask
            kept = torch.zeros(rows, m, dtype=torch.bool).scatter_(1, order, True)
            keep[:, start + i:start + j] = kept
            scale = (~kept) / u_diag[None, :]  # [c removed] / U_cc
            coupling = torch.triu(u_block[i:j, i:j], diagonal=1)
            error = values * scale
            for _ in range(m - 1):
                error = (values - error @ coupling) * scale
            final = (values - error @ coupling) * kept  # each column as it stands when it is reached
            w_block[:, j:] -= error @ u_block[i:j, j:]
            w_block[:, i:j] = final
            errors[:, i:j] = error
        w[:, start:stop] = w_block
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return keep, w * keep


class HessianMask(MaskMethod):
    name = "hessian"
    description = "minimise layer output error with the calibration Hessian (SparseGPT/OBS with --update-weights)"
    needs = frozenset({"hessian"})
    can_update_weights = True

    def scores(self, weight: torch.Tensor, layer, context: MaskContext) -> torch.Tensor:
        h = _hessian(context)
        matrix = gemm_matrix(weight.detach().double(), layer.reduction_axis)
        return from_gemm_matrix(matrix * matrix * torch.diagonal(h)[None, :], tuple(weight.shape), layer.reduction_axis)

    def select(self, weight: torch.Tensor, layer, context: MaskContext | None = None) -> torch.Tensor:
        context = context or MaskContext()
        h = _hessian(context)
        matrix = gemm_matrix(weight.detach(), layer.reduction_axis)
        linear = (context.statistics.upstream_linear(matrix, centered=bool(context.options.get("centered")))
                  if context.options.get("dense_target") else None)  # row r: C w_r
        keep = min_output_error_mask(matrix, h, self.n, self.m, linear=linear)
        return from_gemm_matrix(keep, tuple(weight.shape), layer.reduction_axis)

    def select_and_update(self, weight: torch.Tensor, layer, context: MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        h = _hessian(context)
        matrix = gemm_matrix(weight.detach(), layer.reduction_axis)
        keep, updated = obs_prune(matrix, h, self.n, self.m)
        shape = tuple(weight.shape)
        return (from_gemm_matrix(keep, shape, layer.reduction_axis),
                from_gemm_matrix(updated.to(weight.dtype), shape, layer.reduction_axis))
