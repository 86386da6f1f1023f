"""The vectorised hessian routines against plain loops (the pre-vectorisation code, kept here as the reference).

``_coordinate_descent_starts`` stacks the starts as rows and refreshes ``H d`` per block of
groups; ``obs_prune`` handles a group of columns at a time with one Cholesky factorisation.
Neither may change what is computed beyond floating-point rounding: on problems without ties
the masks are identical and the objective agrees to 1e-6 relative.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsecompile.masks.base import topn_mask
from sparsecompile.masks.hessian import _coordinate_descent_starts, _row_errors, min_output_error_mask, obs_prune
from sparsecompile.masks.statistics import InputStatistics


def _reference_descent(w, h, keep, n, m, sweeps, linear=None):
    """One start, one group at a time, the whole gradient updated after every group."""
    rows, k = w.shape
    keep = keep.clone()
    patterns = list(itertools.combinations(range(m), n))
    keep_patterns = torch.zeros(len(patterns), m, dtype=torch.float64)
    for index, pattern in enumerate(patterns):
        keep_patterns[index, list(pattern)] = 1.0
    removed = w * (~keep)
    gradient = removed @ h
    fixed = linear if linear is not None else torch.zeros_like(w)
    for _ in range(sweeps):
        changed = 0
        for g in range(k // m):
            cols = slice(g * m, (g + 1) * m)
            h_gg = h[cols, cols]
            old = removed[:, cols]
            others = gradient[:, cols] - old @ h_gg + fixed[:, cols]
            candidates = w[:, cols][:, None, :] * (1.0 - keep_patterns)[None, :, :]
            energy = torch.einsum("rpi,ij,rpj->rp", candidates, h_gg, candidates) + 2 * torch.einsum(
                "rpi,ri->rp", candidates, others)
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


def _reference_obs(matrix, hessian, n, m, damp=0.01, block=128):
    """Column by column, with ``H^-1`` through ``cholesky_inverse`` and a second factorisation."""
    w = matrix.double().clone()
    h = hessian.double().clone()
    rows, k = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
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


def _problem(seed, rows, k, samples=None, linear=False):
    g = torch.Generator().manual_seed(seed)
    samples = samples or 2 * k
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5 + torch.eye(k, dtype=torch.float64)
    x = torch.randn(samples, k, generator=g, dtype=torch.float64) @ mix  # correlated columns
    h = x.T @ x / samples
    w = torch.randn(rows, k, generator=g, dtype=torch.float64)
    c = (torch.randn(k, k, generator=g, dtype=torch.float64) * 0.1) if linear else None
    return w, h, (w @ c.T if c is not None else None)


def _starts(w, h, n, m, linear):
    starts = [topn_mask(w * w * torch.diagonal(h)[None, :], 1, n, m), topn_mask(w.abs(), 1, n, m),
              _reference_obs(w, h, n, m)[0]]
    if linear is not None:
        starts.append(topn_mask(w * w * torch.diagonal(h)[None, :] + 2 * w * linear, 1, n, m))
    return starts


@pytest.mark.parametrize("seed,rows,k,n,m,linear", [
    (0, 7, 64, 2, 4, False), (1, 5, 96, 2, 4, True), (2, 12, 160, 2, 4, True),  # 160: blocks of 32 groups + rest
    (3, 4, 64, 1, 4, False), (4, 3, 48, 4, 8, True), (5, 9, 300, 2, 4, False),
])
def test_descent_matches_the_reference(seed, rows, k, n, m, linear):
    w, h, lin = _problem(seed, rows, k, linear=linear)
    starts = _starts(w, h, n, m, lin)
    got = _coordinate_descent_starts(w, h, starts, n, m, 3, lin)
    for start, keep in zip(starts, got):
        expected = _reference_descent(w, h, start, n, m, 3, lin)
        assert torch.equal(keep, expected)
        ref_error, new_error = _row_errors(w, expected, h, lin), _row_errors(w, keep, h, lin)
        assert torch.allclose(new_error, ref_error, rtol=1e-6, atol=0)


def test_descent_with_zero_weights_matches_the_reference():
    """Zero weights make patterns with equal removed values: the lone descent's tie rule still holds."""
    w, h, lin = _problem(6, 8, 128, linear=True)
    g = torch.Generator().manual_seed(6)
    w[torch.rand(w.shape, generator=g) < 0.3] = 0.0
    lin = lin * (w != 0)
    starts = _starts(w, h, 2, 4, lin)
    got = _coordinate_descent_starts(w, h, starts, 2, 4, 3, lin)
    for start, keep in zip(starts, got):
        assert torch.equal(keep, _reference_descent(w, h, start, 2, 4, 3, lin))


@pytest.mark.parametrize("seed,rows,k,n,m", [(0, 6, 64, 2, 4), (1, 10, 200, 2, 4), (2, 5, 272, 2, 4),
                                              (3, 4, 64, 1, 4), (4, 3, 48, 4, 8)])
def test_obs_matches_the_reference(seed, rows, k, n, m):
    w, h, _ = _problem(seed, rows, k)
    h[5, :] = 0.0  # a dead input column
    h[:, 5] = 0.0
    keep, updated = obs_prune(w, h, n, m)
    ref_keep, ref_updated = _reference_obs(w, h, n, m)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(updated, ref_updated, rtol=1e-9, atol=1e-9)


def test_min_output_error_mask_is_the_best_reference_start():
    w, h, lin = _problem(7, 11, 128, linear=True)
    keep = min_output_error_mask(w.float(), h, 2, 4, linear=lin)
    results = [_reference_descent(w, h, start, 2, 4, 3, lin) for start in _starts(w, h, 2, 4, lin)]
    errors = torch.stack([_row_errors(w, r, h, lin) for r in results])
    expected = torch.stack(results)[errors.argmin(0), torch.arange(w.shape[0])]
    assert torch.equal(keep, expected)
    assert torch.allclose(_row_errors(w, keep, h, lin), errors.min(0).values, rtol=1e-6, atol=0)


def test_masks_are_deterministic():
    w, h, lin = _problem(8, 9, 256, linear=True)
    first = min_output_error_mask(w, h, 2, 4, linear=lin)
    assert all(torch.equal(first, min_output_error_mask(w, h, 2, 4, linear=lin)) for _ in range(2))
    keep, updated = obs_prune(w, h, 2, 4)
    again = obs_prune(w, h, 2, 4)
    assert torch.equal(keep, again[0]) and torch.equal(updated, again[1])


def test_statistics_match_float64_and_are_deterministic():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3000, 1100, generator=g) * 3 + 1  # K > GRAM_BLOCK, rows not a multiple of the chunk
    ref = x + 0.1 * torch.randn(3000, 1100, generator=g)
    stats, again = InputStatistics(1100, hessian=True), InputStatistics(1100, hessian=True)
    for s in (stats, again):
        s.update(x, ref)
        s.update(x[:700], ref[:700])
    x64, ref64 = torch.cat([x, x[:700]]).double(), torch.cat([ref, ref[:700]]).double()
    torch.testing.assert_close(stats.sums, x64.sum(0), rtol=1e-6, atol=1e-6 * x64.abs().sum(0).max().item())
    torch.testing.assert_close(stats.sq_norms, (x64 ** 2).sum(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.shift_sums, (ref64 - x64).sum(0), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(stats.gram, x64.T @ x64, rtol=1e-5, atol=1e-2)
    assert torch.equal(stats.gram, stats.gram.T) or torch.allclose(stats.gram, stats.gram.T, rtol=1e-6, atol=1e-3)
    for name in ("sums", "sq_norms", "shift_sums", "gram", "cross"):
        assert torch.equal(getattr(stats, name), getattr(again, name)), name


def test_obs_prune_survives_a_slightly_indefinite_hessian():
    # A centered Hessian summed in float32 can come out slightly indefinite (a real CNN's layer did);
    # the default 1% damping is then not enough, and the factorisation must retry with more.
    from sparsecompile.masks.hessian import obs_prune

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=generator, dtype=torch.float64)
    h = x.T @ x / 64
    h -= 2.0 * torch.eye(16, dtype=torch.float64) * float(torch.linalg.eigvalsh(h)[0] + 0.5)  # push below zero
    assert float(torch.linalg.eigvalsh(h + 0.01 * torch.diagonal(h).mean() * torch.eye(16, dtype=h.dtype))[0]) < 0
    weight = torch.randn(8, 16, generator=generator)
    keep, updated = obs_prune(weight, h, 2, 4)
    assert keep.reshape(8, 4, 4).sum(-1).eq(2).all() and torch.isfinite(updated).all()
