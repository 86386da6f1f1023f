"""Activation-aware and Hessian masks: correct objective, exact N:M, TensorRT layout."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsecompile.layers import GemmLayer
from sparsecompile.masks import MaskContext, get_method, topn_mask
from sparsecompile.masks.hessian import min_output_error_mask, obs_prune
from sparsecompile.masks.statistics import InputStatistics, gemm_matrix
from sparsecompile.verify import count_nm_violations


def _context(columns: torch.Tensor, hessian: bool = True) -> MaskContext:
    stats = InputStatistics(columns.shape[1], hessian=hessian)
    stats.update(columns)
    return MaskContext(statistics=stats)


def _layer(shape, axis=1):
    return GemmLayer("layer", "node", "conv2d" if len(shape) == 4 else "linear", "layer.weight", tuple(shape), axis)


def _output_error(weight, kept, x):
    return float(((weight - kept).double() @ x.double().T).pow(2).sum())


def _correlated_inputs(samples, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    scales = torch.rand(k, generator=g) * 3 + 0.1
    return (torch.randn(samples, k, generator=g) @ mixing) * scales


def test_activation_mask_prefers_loud_channels():
    weight = torch.tensor([[1.0, 1.1, 0.9, 1.05]])
    x = torch.tensor([[10.0, 0.1, 10.0, 0.1]] * 3)
    mask = get_method("activation").select(weight, _layer((1, 4)), _context(x, hessian=False))
    assert mask.tolist() == [[True, False, True, False]]
    magnitude = get_method("magnitude").select(weight, _layer((1, 4)), MaskContext())
    assert magnitude.tolist() == [[False, True, False, True]]


def test_calibrated_conv_masks_are_in_the_tensorrt_layout():
    """Groups of 4 input channels at each kernel position, not the flattened cin*kh*kw axis."""
    weight = torch.randn(8, 8, 3, 3)
    x = _correlated_inputs(512, 72)  # columns ordered (kh, kw, cin), as gemm_columns produces them
    for name in ("activation", "hessian"):
        mask = get_method(name).select(weight, _layer(weight.shape), _context(x))
        assert count_nm_violations(mask.float(), 1) == 0
        assert int(mask.sum()) == weight.numel() // 2
        matrix = gemm_matrix(mask, 1)
        assert torch.equal(matrix.reshape(8, 18, 4).sum(-1), torch.full((8, 18), 2))


def _brute_force_error(weight, h, n=2, m=4):
    best = 0.0
    patterns = list(itertools.combinations(range(m), n))
    for row in weight.double():
        errors = []
        for choice in itertools.product(patterns, repeat=row.numel() // m):
            keep = torch.zeros_like(row, dtype=torch.bool)
            for g, pattern in enumerate(choice):
                keep[[g * m + p for p in pattern]] = True
            d = row * ~keep
            errors.append(float(d @ h @ d))
        best += min(errors)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_hessian_mask_minimises_output_error(seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 8, generator=g)
    x = _correlated_inputs(256, 8, seed)
    h = (x.double().T @ x.double()) / 256
    keep = min_output_error_mask(weight, h, 2, 4)
    error = _output_error(weight, weight * keep, x)
    magnitude = _output_error(weight, weight * topn_mask(weight.abs(), 1, 2, 4), x)
    diagonal = _output_error(weight, weight * topn_mask(weight ** 2 * torch.diagonal(h).float(), 1, 2, 4), x)
    optimum = _brute_force_error(weight, h) * 256
    assert error <= diagonal * (1 + 1e-9) and error <= magnitude * (1 + 1e-9)
    assert error <= optimum * 1.05  # coordinate descent lands at (or next to) the brute-force optimum


def test_hessian_mask_with_diagonal_hessian_is_exact():
    weight = torch.randn(5, 16)
    h = torch.diag(torch.rand(16, dtype=torch.float64) + 0.1)
    keep = min_output_error_mask(weight, h, 2, 4)
    expected = topn_mask(weight.double() ** 2 * torch.diagonal(h), 1, 2, 4)
    assert torch.equal(keep, expected)


def test_obs_update_compensates():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 32, generator=g)
    x = _correlated_inputs(1024, 32, 3)
    h = (x.double().T @ x.double()) / 1024
    keep, updated = obs_prune(weight, h, 2, 4)
    assert count_nm_violations(updated, 1) == 0 and torch.equal(updated != 0, keep & (updated != 0))
    masked_only = _output_error(weight, weight * keep, x)
    compensated = _output_error(weight, updated, x)
    assert compensated < 0.8 * masked_only


def test_hessian_select_and_update_keeps_pattern_and_shape():
    method = get_method("hessian")
    weight = torch.randn(4, 8, 3, 3)
    context = _context(_correlated_inputs(300, 72))
    mask, updated = method.select_and_update(weight, _layer(weight.shape), context)
    assert updated.shape == weight.shape and updated.dtype == weight.dtype
    assert count_nm_violations(updated * mask, 1) == 0
    assert not torch.equal(updated[mask], weight[mask])  # surviving weights were compensated
    plain = method.select(weight, _layer(weight.shape), context)
    assert plain.shape == weight.shape


def test_methods_without_statistics_fail_clearly():
    with pytest.raises(ValueError, match="calibration"):
        get_method("activation").select(torch.randn(2, 4), _layer((2, 4)), MaskContext())
    with pytest.raises(ValueError, match="Hessian"):
        get_method("hessian").select(torch.randn(2, 4), _layer((2, 4)), MaskContext())


def _upstream_problem(seed, samples=512, k=8):
    """Dense inputs ``x_ref`` and the sparse model's ``x`` = x_ref plus an error correlated with it."""
    g = torch.Generator().manual_seed(seed)
    x_ref = _correlated_inputs(samples, k, seed)
    x = x_ref @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g)) + 0.2 * torch.randn(samples, k, generator=g)
    return x_ref, x


def test_upstream_cross_statistics_match_a_direct_computation():
    x_ref, x = _upstream_problem(0, samples=200)
    stats = InputStatistics(8, hessian=True)
    for start in range(0, 200, 50):  # several updates accumulate
        stats.update(x[start:start + 50], x_ref[start:start + 50])
    expected = x.double().T @ (x_ref - x).double() / 200
    assert torch.allclose(stats.upstream_cross(), expected, atol=1e-5)
    xc, dc = x.double() - x.double().mean(0), (x_ref - x).double() - (x_ref - x).double().mean(0)
    assert torch.allclose(stats.upstream_cross(centered=True), xc.T @ dc / 200, atol=1e-5)
    assert InputStatistics(8, hessian=True).upstream_cross() is None  # no reference inputs: no term


def test_upstream_linear_from_the_weight_equals_w_times_the_full_cross_term():
    # Given the weight, the statistics accumulate W C^T ([rows, K]) instead of C ([K, K]): same numbers.
    x_ref, x = _upstream_problem(1, samples=200)
    weight = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    full, projected = InputStatistics(8, hessian=True), InputStatistics(8, hessian=True, weight_matrix=weight)
    for start in range(0, 200, 50):
        full.update(x[start:start + 50], x_ref[start:start + 50])
        projected.update(x[start:start + 50], x_ref[start:start + 50])
    assert projected.cross is None and projected.linear_sum.shape == (5, 8)  # the K x K term is never built
    for centered in (False, True):
        expected = weight.double() @ full.upstream_cross(centered=centered).T
        assert torch.allclose(projected.upstream_linear(weight, centered=centered), expected, atol=1e-5)
        assert torch.allclose(full.upstream_linear(weight, centered=centered), expected, atol=1e-12)
    assert InputStatistics(8, hessian=True, weight_matrix=weight).upstream_linear(weight) is None


@pytest.mark.parametrize("seed", range(3))
def test_dense_target_mask_minimises_the_error_against_the_dense_output(seed):
    """With upstream error, the linear term finds the brute-force optimum of ||w x_ref - (w - d) x||^2."""
    g = torch.Generator().manual_seed(seed + 10)
    weight = torch.randn(4, 8, generator=g)
    x_ref, x = _upstream_problem(seed)
    stats = InputStatistics(8, hessian=True)
    stats.update(x, x_ref)
    h, cross = stats.hessian(), stats.upstream_cross()
    keep = min_output_error_mask(weight, h, 2, 4, linear=weight.double() @ cross.T)
    plain = min_output_error_mask(weight, h, 2, 4)

    def dense_error(mask):
        return float((x_ref.double() @ weight.double().T - x.double() @ (weight * mask).double().T).pow(2).sum())

    patterns = list(itertools.combinations(range(4), 2))
    optimum = 0.0
    for r in range(weight.shape[0]):
        errors = []
        for choice in itertools.product(patterns, repeat=2):
            mask = torch.zeros(8, dtype=torch.bool)
            for group, pattern in enumerate(choice):
                mask[[group * 4 + p for p in pattern]] = True
            errors.append(float((x_ref.double() @ weight[r].double() - x.double() @ (weight[r] * mask).double())
                                .pow(2).sum()))
        optimum += min(errors)
    assert dense_error(keep) <= optimum * 1.05  # coordinate descent lands at (or next to) the brute-force optimum
    assert dense_error(keep) <= dense_error(plain) * (1 + 1e-9)
    assert count_nm_violations(keep.float(), 1, 2, 4) == 0
