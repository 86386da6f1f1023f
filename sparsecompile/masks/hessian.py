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
    (``InputStatistics.upstream_cross``; centered when a correction follows).
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
    keeps, row by row, the best result.
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
    for start in starts:
        keep = _coordinate_descent(w, h, start, n, m, sweeps, linear)
        error = _row_errors(w, keep, h, linear)
        if best is None:
            best, best_error = keep, error
        else:
            better = error < best_error
            best[better] = keep[better]
            best_error = torch.minimum(error, best_error)
    return best


def _coordinate_descent(w, h, keep, n, m, sweeps, linear=None):
    rows, k = w.shape
    groups = k // m
    keep = keep.clone()
    patterns = [p for p in itertools.combinations(range(m), n)]
    if len(patterns) > MAX_PATTERNS or sweeps <= 0:
        return keep
    keep_patterns = torch.zeros(len(patterns), m, dtype=torch.float64)
    for index, pattern in enumerate(patterns):
        keep_patterns[index, list(pattern)] = 1.0
    removed = w * (~keep)
    gradient = removed @ h  # [rows, K]: (H d) for every row
    fixed = linear if linear is not None else torch.zeros_like(w)  # the objective's linear term, per entry
    for _ in range(sweeps):
        changed = 0
        for g in range(groups):
            cols = slice(g * m, (g + 1) * m)
            h_gg = h[cols, cols]
            old = removed[:, cols]
            others = gradient[:, cols] - old @ h_gg + fixed[:, cols]  # the other groups, and the linear term
            candidates = w[:, cols][:, None, :] * (1.0 - keep_patterns)[None, :, :]  # [rows, P, m]
            energy = torch.einsum("rpi,ij,rpj->rp", candidates, h_gg, candidates) + 2 * torch.einsum(
                "rpi,ri->rp", candidates, others
            )
            best = energy.argmin(1)
            new = candidates[torch.arange(rows), best]
            delta = new - old
            moved = delta.abs().sum(1) > 0
            if moved.any():
                changed += int(moved.sum())
                removed[:, cols] = new
                gradient += delta @ h[cols, :]
                keep[:, cols] = keep_patterns[best].bool()
        if changed == 0:
            break
    return keep


def obs_prune(matrix: torch.Tensor, hessian: torch.Tensor, n: int, m: int, damp: float = 0.01,
              block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT-style N:M pruning with weight compensation: (keep-mask, updated weights)."""
    w = matrix.double().clone()
    h = hessian.double().clone()
    rows, k = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(h_inv, upper=True)  # H^-1 = U^T U
    keep = torch.ones(rows, k, dtype=torch.bool)
    block = max(m, block - block % m)
    for start in range(0, k, block):
        stop = min(start + block, k)
        w_block = w[:, start:stop].clone()
        u_block = u[start:stop, start:stop]
        errors = torch.zeros_like(w_block)
        for i in range(stop - start):
            if i % m == 0:
                saliency = w_block[:, i:i + m] ** 2 / torch.diagonal(u_block)[i:i + m][None, :] ** 2
                keep[:, start + i:start + i + m] = topn_mask(saliency, 1, n, m)
            column = w_block[:, i]
            kept_column = torch.where(keep[:, start + i], column, torch.zeros_like(column))
            error = (column - kept_column) / u_block[i, i]
            w_block[:, i:] -= error[:, None] * u_block[i, i:][None, :]
            w_block[:, i] = kept_column
            errors[:, i] = error
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
        cross = (context.statistics.upstream_cross(centered=bool(context.options.get("centered")))
                 if context.options.get("dense_target") else None)
        linear = matrix.double() @ cross.T if cross is not None else None  # row r: C w_r
        keep = min_output_error_mask(matrix, h, self.n, self.m, linear=linear)
        return from_gemm_matrix(keep, tuple(weight.shape), layer.reduction_axis)

    def select_and_update(self, weight: torch.Tensor, layer, context: MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        h = _hessian(context)
        matrix = gemm_matrix(weight.detach(), layer.reduction_axis)
        keep, updated = obs_prune(matrix, h, self.n, self.m)
        shape = tuple(weight.shape)
        return (from_gemm_matrix(keep, shape, layer.reduction_axis),
                from_gemm_matrix(updated.to(weight.dtype), shape, layer.reduction_axis))
