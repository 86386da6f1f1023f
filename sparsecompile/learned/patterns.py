"""The C(M, N) keep-patterns of an N:M group, and masks <-> pattern indices.

A *keep-pattern* is a boolean vector of length M with exactly N ``True``
entries. Patterns are numbered in the lexicographic order of
``itertools.combinations(range(m), n)`` (the kept positions, ascending), so
for 2:4 the 6 patterns are::

    0: (0, 1)  1100      3: (1, 2)  0110
    1: (0, 2)  1010      4: (1, 3)  0101
    2: (0, 3)  1001      5: (2, 3)  0011

Groups follow the codebase's layout (see :mod:`sparsecompile.compress`): the
weight is viewed as the ``[rows, K]`` GEMM matrix with the reduction axis last
(:func:`~sparsecompile.compress.gemm_view`), and each row is cut into
``G = K // M`` groups of M consecutive entries. For a conv weight
``[Cout, Cin, kh, kw]`` (axis 1) a group is M consecutive input channels at
one kernel position -- TensorRT's layout, not the flattened ``cin*kh*kw`` one
of the seed paper. A layer's pattern indices are a ``[rows, G]`` int64 tensor.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from sparsecompile.compress import from_gemm_view, gemm_view
from sparsecompile.errors import SparseCompileError


def _check(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or not 1 <= n < m:
        raise SparseCompileError(f"invalid {n}:{m} pattern: need integers with 1 <= n < m")
    if m > 16:
        raise SparseCompileError(f"group size m={m} is too large for pattern enumeration (at most 16)")


def num_patterns(n: int = 2, m: int = 4) -> int:
    """``C(m, n)``: 6 for 2:4."""
    _check(n, m)
    return math.comb(m, n)


@functools.lru_cache(maxsize=None)
def _patterns(n: int, m: int) -> torch.Tensor:
    rows = [[position in kept for position in range(m)] for kept in itertools.combinations(range(m), n)]
    return torch.tensor(rows, dtype=torch.bool)


def keep_patterns(n: int = 2, m: int = 4) -> torch.Tensor:
    """All N:M keep-patterns as a bool tensor ``[C(m, n), m]`` (a fresh copy)."""
    _check(n, m)
    return _patterns(n, m).clone()


def pattern_matrix(n: int = 2, m: int = 4, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The patterns as a ``[C(m, n), m]`` 0/1 matrix, so ``probs @ D`` is a (soft) group mask."""
    return keep_patterns(n, m).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _code_table(n: int, m: int) -> torch.Tensor:
    """bit code (sum of 2**position over kept positions) -> pattern index, -1 if not N kept."""
    table = torch.full((1 << m,), -1, dtype=torch.int64)
    weights = 1 << torch.arange(m, dtype=torch.int64)
    codes = (_patterns(n, m).to(torch.int64) * weights).sum(-1)
    table[codes] = torch.arange(codes.numel())
    return table


def group_view(tensor: torch.Tensor, reduction_axis: int, m: int = 4) -> torch.Tensor:
    """``tensor`` as ``[rows, G, m]`` groups (a view when possible)."""
    matrix = gemm_view(tensor, reduction_axis)
    rows, k = matrix.shape
    if k % m:
        raise SparseCompileError(f"reduction axis of length {k} is not a multiple of m={m}")
    return matrix.reshape(rows, k // m, m)


def from_group_view(groups: torch.Tensor, shape, reduction_axis: int) -> torch.Tensor:
    """Inverse of :func:`group_view`: ``[rows, G, m]`` back to a tensor of ``shape``."""
    rows, g, m = groups.shape
    return from_gemm_view(groups.reshape(rows, g * m), shape, reduction_axis)


def mask_to_patterns(mask: torch.Tensor, reduction_axis: int, n: int = 2, m: int = 4) -> torch.Tensor:
    """Pattern index ``[rows, G]`` (int64) of every group of a bool keep-mask.

    Raises :class:`SparseCompileError` if a group does not keep exactly N.
    """
    _check(n, m)
    groups = group_view(mask.to(torch.bool), reduction_axis, m).to(torch.int64)
    weights = 1 << torch.arange(m, dtype=torch.int64, device=groups.device)
    codes = (groups * weights).sum(-1)
    indices = _code_table(n, m).to(groups.device)[codes]
    if bool((indices < 0).any()):
        bad = int((indices < 0).sum())
        raise SparseCompileError(f"mask is not {n}:{m}: {bad} group(s) do not keep exactly {n} of {m}")
    return indices


def patterns_to_mask(indices: torch.Tensor, shape, reduction_axis: int, n: int = 2, m: int = 4) -> torch.Tensor:
    """Bool keep-mask of ``shape`` from per-group pattern indices ``[rows, G]``."""
    _check(n, m)
    patterns = _patterns(n, m).to(indices.device)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= patterns.shape[0]):
        raise SparseCompileError(f"pattern index out of range [0, {patterns.shape[0]})")
    return from_group_view(patterns[indices.to(torch.int64)], shape, reduction_axis)


def soft_mask(pattern_weights: torch.Tensor, shape, reduction_axis: int, n: int = 2, m: int = 4) -> torch.Tensor:
    """Differentiable mask of ``shape`` from per-group pattern weights ``[rows, G, C(m, n)]``.

    Entry ``(r, g, j)`` of the group mask is ``sum_p weights[r, g, p] * D[p, j]``:
    a one-hot row gives that pattern's 0/1 mask, a probability row gives each
    position's probability of being kept.
    """
    matrix = pattern_matrix(n, m, dtype=pattern_weights.dtype, device=pattern_weights.device)
    return from_group_view(pattern_weights @ matrix, shape, reduction_axis)


__all__ = [
    "from_group_view", "group_view", "keep_patterns", "mask_to_patterns", "num_patterns",
    "pattern_matrix", "patterns_to_mask", "soft_mask",
]
