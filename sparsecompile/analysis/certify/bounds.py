"""Operator-norm arithmetic for :mod:`sparsecompile.analysis.certify`: guaranteed upper bounds on the spectral
norm of matrices and of convolutions on a given input size, and the power-iteration lower estimate reported
next to them (never used in a bound)."""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch

# Relative margin on computed norms (float64 SVD/FFT rounding is ~1e-13; this is generous).
NORM_SAFETY = 1e-6
# Convolutions whose symbol (frequencies x Cout x Cin*stride^2 entries) exceeds this use the looser bound
# ||W_gemm|| * sqrt(taps per input element); below it the exact-symbol bound is computed in chunks.
MAX_FFT_ELEMENTS = 1 << 31


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
