"""N:M keep-patterns and the mask <-> pattern-index maps, in the codebase's group layout."""

from __future__ import annotations

import math

import pytest
import torch

from sparsecompile.errors import SparseCompileError
from sparsecompile.learned.patterns import (
    group_view, keep_patterns, mask_to_patterns, num_patterns, patterns_to_mask, soft_mask,
)
from sparsecompile.masks import topn_mask
from sparsecompile.verify import count_nm_violations


def test_the_six_2_4_patterns_in_lexicographic_order():
    patterns = keep_patterns(2, 4)
    assert patterns.dtype == torch.bool and patterns.shape == (6, 4)
    kept = [tuple(row.nonzero().flatten().tolist()) for row in patterns]
    assert kept == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (1, 2)])
def test_every_pattern_keeps_n_and_all_are_distinct(n, m):
    patterns = keep_patterns(n, m)
    assert patterns.shape == (math.comb(m, n), m) == (num_patterns(n, m), m)
    assert bool((patterns.sum(-1) == n).all())
    assert len({tuple(row.tolist()) for row in patterns}) == patterns.shape[0]


@pytest.mark.parametrize("shape,axis", [((8, 16, 3, 3), 1), ((6, 16), 1), ((24, 6), 0), ((4, 8, 5), 1)])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_mask_pattern_round_trip(shape, axis, n, m):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = topn_mask(scores, axis, n, m)
    indices = mask_to_patterns(mask, axis, n, m)
    rows = scores.numel() // shape[axis]
    assert indices.shape == (rows, shape[axis] // m) and indices.dtype == torch.int64
    back = patterns_to_mask(indices, shape, axis, n, m)
    assert back.dtype == torch.bool and torch.equal(back, mask)
    assert count_nm_violations(torch.where(back, 1.0, 0.0), axis, n, m) == 0


def test_conv_groups_are_consecutive_input_channels_at_one_kernel_position():
    shape = (3, 8, 2, 2)  # [Cout, Cin, kh, kw], reduction axis 1
    indices = torch.zeros(3 * 2 * 2, 2, dtype=torch.int64)  # pattern 0 keeps in-group positions 0 and 1
    indices[:, 1] = 5  # second group of every row: positions 2 and 3
    mask = patterns_to_mask(indices, shape, 1, 2, 4)
    for cin in range(8):
        expected = cin in (0, 1, 6, 7)
        assert bool((mask[:, cin] == expected).all()), cin


def test_soft_mask_of_one_hot_weights_is_the_pattern_mask():
    shape, axis = (4, 8, 3, 3), 1
    indices = torch.randint(0, 6, (4 * 9, 2), generator=torch.Generator().manual_seed(1))
    one_hot = torch.nn.functional.one_hot(indices, 6).float()
    assert torch.equal(soft_mask(one_hot, shape, axis).bool(), patterns_to_mask(indices, shape, axis))
    uniform = torch.full((4 * 9, 2, 6), 1 / 6)
    assert torch.allclose(soft_mask(uniform, shape, axis), torch.full(shape, 0.5))  # each position kept in 3 of 6


def test_group_view_matches_gemm_layout():
    weight = torch.arange(2 * 8 * 1 * 1).reshape(2, 8, 1, 1)
    groups = group_view(weight, 1, 4)
    assert groups.shape == (2, 2, 4)
    assert groups[1, 1].tolist() == [12, 13, 14, 15]


def test_a_mask_that_is_not_n_m_is_refused():
    mask = torch.tensor([[True, True, True, False, True, True, False, False]])
    with pytest.raises(SparseCompileError, match="not 2:4"):
        mask_to_patterns(mask, 1, 2, 4)
    with pytest.raises(SparseCompileError, match="out of range"):
        patterns_to_mask(torch.tensor([[6]]), (1, 4), 1)
    with pytest.raises(SparseCompileError):
        keep_patterns(4, 4)
