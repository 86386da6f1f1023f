"""Layer-input statistics: columns in the GEMM order, with the convolution's real geometry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import export_graph
from sparsecompile.masks.statistics import (
    InputStatistics, activation_input, from_gemm_matrix, gemm_columns, gemm_matrix,
)


def _node(gm, name_part):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and name_part in str(n.target))


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2), (2, 1, 1)])
def test_conv_columns_reproduce_the_convolution(stride, padding, dilation):
    conv = nn.Conv2d(8, 6, 3, stride=stride, padding=padding, dilation=dilation, bias=False).eval()
    x = torch.randn(2, 8, 9, 9)
    gm = export_graph(conv, x)
    node = _node(gm, "conv2d")
    source, kind = activation_input(node, "weight")
    assert kind == "conv" and source.op == "placeholder"
    cols = gemm_columns(node, kind, x, tuple(conv.weight.shape))  # [N*L, kh*kw*Cin]
    matrix = gemm_matrix(conv.weight.detach(), 1)  # [Cout, kh*kw*Cin], ordered (kh, kw, cin)
    expected = conv(x)
    got = (cols @ matrix.T).reshape(2, -1, 6).permute(0, 2, 1).reshape(expected.shape)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_padding_is_counted_as_zeros():
    """modelopt-style calibration that ignores padding would see only interior pixels."""
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False).eval()
    x = torch.ones(1, 4, 5, 5)
    gm = export_graph(conv, x)
    node = _node(gm, "conv2d")
    stats = InputStatistics(36, hessian=False)
    stats.update(gemm_columns(node, "conv", x, tuple(conv.weight.shape)))
    norms = stats.sq_norms.reshape(3, 3, 4)  # (kh, kw, cin)
    assert torch.equal(norms[1, 1], torch.full((4,), 25.0, dtype=torch.float64))  # centre tap sees every pixel
    assert torch.equal(norms[0, 0], torch.full((4,), 16.0, dtype=torch.float64))  # corner tap sees 4x4 of them


def test_conv1d_and_linear_and_left_operand_columns():
    conv = nn.Conv1d(4, 8, 3, padding=1, bias=False).eval()
    x = torch.randn(2, 4, 10)
    gm = export_graph(conv, x)
    node = _node(gm, "conv1d")
    cols = gemm_columns(node, "conv", x, tuple(conv.weight.shape))
    got = (cols @ gemm_matrix(conv.weight.detach(), 1).T).reshape(2, 10, 8).permute(0, 2, 1)
    torch.testing.assert_close(got, conv(x), rtol=1e-4, atol=1e-5)

    class Left(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 8))

        def forward(self, x):
            return self.w @ x

    left = Left().eval()
    x = torch.randn(3, 8, 5)
    gm = export_graph(left, x)
    node = _node(gm, "matmul")
    source, kind = activation_input(node, "w")
    assert kind == "left"
    cols = gemm_columns(node, kind, x, (6, 8))
    assert cols.shape == (15, 8)
    torch.testing.assert_close(cols @ left.w.detach().T, (left(x)).transpose(-1, -2).reshape(15, 6))


def test_gemm_matrix_round_trip():
    weight = torch.randn(5, 8, 3, 3)
    matrix = gemm_matrix(weight, 1)
    assert matrix.shape == (5, 72)
    torch.testing.assert_close(matrix, weight.permute(0, 2, 3, 1).reshape(5, -1))
    assert torch.equal(from_gemm_matrix(matrix, (5, 8, 3, 3), 1), weight)
    stored_kn = torch.randn(12, 7)
    assert torch.equal(gemm_matrix(stored_kn, 0), stored_kn.T)
    assert torch.equal(from_gemm_matrix(stored_kn.T, (12, 7), 0), stored_kn)


def test_gram_matrix_accumulates_over_chunks():
    stats = InputStatistics(3, hessian=True)
    a, b = torch.randn(4, 3), torch.randn(6, 3)
    stats.update(a)
    stats.update(b)
    both = torch.cat([a, b]).double()
    assert stats.count == 10
    torch.testing.assert_close(stats.gram, both.T @ both, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.column_norms, both.norm(dim=0))


def test_centered_hessian_is_the_input_covariance():
    x = torch.randn(500, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + torch.tensor([5.0, -1.0, 0.0, 2.0])
    stats = InputStatistics(4, hessian=True)
    stats.update(x)
    x64 = x.double()
    torch.testing.assert_close(stats.hessian(), x64.T @ x64 / 500, rtol=1e-5, atol=1e-5)  # fp32 products
    centered = x64 - x64.mean(0)
    torch.testing.assert_close(stats.hessian(centered=True), centered.T @ centered / 500, rtol=1e-4, atol=1e-4)


def test_large_updates_subsample_rows_for_the_gram_matrix():
    from sparsecompile.masks.statistics import GRAM_ROWS_PER_UPDATE

    x = torch.randn(3 * GRAM_ROWS_PER_UPDATE + 5, 6) * torch.arange(1.0, 7.0)
    stats = InputStatistics(6, hessian=True)
    stats.update(x)
    assert stats.count == x.shape[0] and stats.gram_count <= GRAM_ROWS_PER_UPDATE
    exact = x.double().T @ x.double() / x.shape[0]
    assert float((stats.hessian() - exact).norm() / exact.norm()) < 0.05  # an estimate from 1/3 of the rows
    torch.testing.assert_close(stats.column_norms, x.double().norm(dim=0))  # norms use every row


@pytest.mark.parametrize("module, shape", [
    (nn.Conv2d(8, 5, (6, 1), bias=False), (3, 8, 20, 2)),  # CREPE-like: a tall kernel, width folded into the batch
    (nn.Conv2d(8, 5, 3, padding=1, bias=False), (2, 8, 7, 6)),
    (nn.Conv2d(4, 5, (3, 2), padding=(2, 1), dilation=(2, 1), bias=False), (2, 4, 9, 5)),
    (nn.Conv2d(4, 5, (5, 1), stride=(1, 3), padding=(2, 0), bias=False), (2, 4, 11, 8)),  # stride on a 1-wide axis
    (nn.Conv1d(8, 5, 7, padding=3, dilation=2, bias=False), (3, 8, 30)),
])
def test_lagged_gram_of_a_stride_one_convolution_equals_the_unfolded_gram(module, shape):
    """The block-Toeplitz sum (``_add_lagged_gram``) is the unfolded columns' X^T X up to rounding."""
    from sparsecompile.masks.statistics import _add_gram, _add_lagged_gram, conv_windows

    conv = module.eval()
    x = torch.randn(*shape) + 0.5
    node = _node(export_graph(conv, x), "conv")
    weight_shape = tuple(conv.weight.shape)
    cols = gemm_columns(node, "conv", x, weight_shape)
    windows = conv_windows(node, "conv", x, weight_shape)
    assert windows is not None
    lagged = torch.zeros(cols.shape[1], cols.shape[1], dtype=torch.float64)
    _add_lagged_gram(lagged, windows)
    exact = cols.double().T @ cols.double()
    torch.testing.assert_close(lagged, exact, rtol=1e-6, atol=1e-5)
    direct = torch.zeros_like(lagged)
    _add_gram(direct, cols)
    assert float((lagged - exact).abs().max()) <= float((direct - exact).abs().max()) + 1e-5  # no worse than fp32 GEMM


def test_lagged_gram_only_where_the_convolution_allows_it():
    from sparsecompile.masks.statistics import conv_windows

    strided = nn.Conv2d(4, 4, 3, stride=2, bias=False).eval()
    x = torch.randn(1, 4, 9, 9)
    node = _node(export_graph(strided, x), "conv")
    assert conv_windows(node, "conv", x, tuple(strided.weight.shape)) is None  # stride along a kernel axis
    grouped = nn.Conv2d(4, 4, 3, groups=2, bias=False).eval()
    node = _node(export_graph(grouped, x), "conv")
    assert conv_windows(node, "conv", x, tuple(grouped.weight.shape)) is None


def test_add_input_sums_a_long_kernel_by_lag_with_the_same_statistics(monkeypatch):
    """CREPE's layers (64 taps): add_input takes the lagged Gram; every statistic agrees with update()'s."""
    from sparsecompile.masks import statistics

    conv = nn.Conv2d(8, 4, (64, 1), bias=False).eval()
    x, reference = torch.randn(4, 8, 80, 1), torch.randn(4, 8, 80, 1)
    node = _node(export_graph(conv, x), "conv")
    weight_shape = tuple(conv.weight.shape)
    matrix = gemm_matrix(conv.weight.detach(), 1)
    lagged = InputStatistics(512, hessian=True, weight_matrix=matrix)
    with monkeypatch.context() as patch:
        patch.setattr(statistics, "_add_gram", None)  # the direct product is not taken
        lagged.add_input(node, "conv", x, weight_shape, reference)
    direct = InputStatistics(512, hessian=True, weight_matrix=matrix)
    direct.update(gemm_columns(node, "conv", x, weight_shape), gemm_columns(node, "conv", reference, weight_shape))
    assert lagged.count == direct.count == lagged.gram_count == 4 * 17
    torch.testing.assert_close(lagged.gram, direct.gram, rtol=1e-5, atol=1e-4)
    for name in ("sums", "sq_norms", "shift_sums", "linear_sum"):
        assert torch.equal(getattr(lagged, name), getattr(direct, name))


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2), (2, 1, 1), ((1, 3), (2, 0), (2, 1))])
def test_conv_columns_are_unfolds_rows_in_kernel_position_order(stride, padding, dilation):
    """The strided-view columns are exactly ``F.unfold``'s, reordered from (cin, kh, kw) to (kh, kw, cin)."""
    conv = nn.Conv2d(8, 6, (3, 2), stride=stride, padding=padding, dilation=dilation, bias=False).eval()
    x = torch.randn(2, 8, 11, 9)
    node = _node(export_graph(conv, x), "conv2d")
    cols = gemm_columns(node, "conv", x, tuple(conv.weight.shape))
    unfolded = torch.nn.functional.unfold(x, (3, 2), dilation=dilation, padding=padding, stride=stride)
    n, _, length = unfolded.shape
    expected = unfolded.reshape(n, 8, 6, length).permute(0, 3, 2, 1).reshape(n * length, 6 * 8)
    assert torch.equal(cols, expected)
