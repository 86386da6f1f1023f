"""Mask methods: exact N:M keep-masks along the layer's reduction axis, checked two independent ways."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from helpers import export_graph, run_pass, seeded
from sparsecompile.errors import SparseCompileError
from sparsecompile.graph import get_tensor
from sparsecompile.layers import GemmLayer, find_layers
from sparsecompile.masks import MASK_METHODS, get_method, topn_mask
from sparsecompile.passes import LowerConvIm2col
from sparsecompile.verify import count_nm_violations


def _layer(weight: torch.Tensor, axis: int) -> GemmLayer:
    return GemmLayer("layer", "node", "test", "layer.weight", tuple(weight.shape), axis)


def brute_force_mask(weight: torch.Tensor, axis: int, n: int, m: int) -> torch.Tensor:
    """Per group of m along ``axis``: keep the n largest |w|, ties to the lower index. Plain loops."""
    keep = torch.zeros(weight.shape, dtype=torch.bool)
    others = [range(size) if d != axis else [None] for d, size in enumerate(weight.shape)]
    for position in itertools.product(*others):
        for start in range(0, weight.shape[axis], m):
            entries = []
            for offset in range(m):
                index = tuple(start + offset if p is None else p for p in position)
                entries.append((-abs(float(weight[index])), offset, index))
            for _, _, index in sorted(entries)[:n]:
                keep[index] = True
    return keep


def brute_force_is_exact_nm(mask: torch.Tensor, axis: int, n: int, m: int) -> bool:
    moved = mask.movedim(axis, -1)
    for row in moved.reshape(-1, mask.shape[axis]).tolist():
        for start in range(0, len(row), m):
            if sum(row[start:start + m]) != n:
                return False
    return True


def test_conv_groups_are_four_input_channels_at_one_kernel_position():
    """W[1, 8, 1, 2]: the answer by hand differs from grouping along the flattened cin*kh*kw axis."""
    weight = torch.zeros(1, 8, 1, 2)
    weight[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0])
    weight[0, :, 0, 1] = torch.tensor([-9.0, 0.5, 9.5, -0.1, 0.0, 0.25, 1.0, -2.0])
    expected = torch.zeros(1, 8, 1, 2, dtype=torch.bool)
    expected[0, [2, 3, 4, 5], 0, 0] = True  # {1,2,3,4} -> 3,4 ; {8,7,6,5} -> 8,7
    expected[0, [0, 2, 6, 7], 0, 1] = True  # {-9,.5,9.5,-.1} -> -9,9.5 ; {0,.25,1,-2} -> 1,-2

    mask = get_method("magnitude").select(weight, _layer(weight, 1))
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert torch.equal(mask, expected)
    assert count_nm_violations(weight * mask, 1) == 0
    assert brute_force_is_exact_nm(mask, 1, 2, 4)
    # the flattened (cin, kh, kw) grouping of the seed papers would choose differently
    flat = topn_mask(weight.abs().reshape(1, 16), 1, 2, 4).reshape(weight.shape)
    assert not torch.equal(flat, expected)


def test_conv_mask_from_graph_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 4, 3)).eval()
    (layer,) = find_layers(export_graph(model, torch.randn(2, 8, 5, 5)))
    weight = model[0].weight.detach()
    mask = get_method("magnitude").select(weight, layer)
    assert layer.reduction_axis == 1
    assert torch.equal(mask, brute_force_mask(weight, 1, 2, 4))
    assert count_nm_violations(weight * mask, layer.reduction_axis) == 0
    assert count_nm_violations(weight * mask, 0) > 0  # the axis matters: not 2:4 along output channels


def test_linear_mask_by_hand():
    weight = torch.tensor([[0.1, -0.9, 0.3, 0.2, 5.0, 4.0, -6.0, 1.0],
                           [1.0, 2.0, -3.0, 0.0, 0.0, 0.0, 0.0, 0.1]])
    expected = torch.tensor([[False, True, True, False, True, False, True, False],
                             [False, True, True, False, True, False, False, True]])  # 0-ties: lowest index
    mask = get_method("magnitude").select(weight, _layer(weight, 1))
    assert torch.equal(mask, expected)
    assert count_nm_violations(weight * mask, 1) == 0


def test_right_operand_mask_runs_down_columns():
    """A [K, N] operand groups along axis 0: 4 consecutive rows of one column."""
    weight = torch.tensor([[1.0, -4.0],
                           [5.0, 3.0],
                           [-2.0, 2.0],
                           [0.5, 1.0]])
    expected = torch.tensor([[False, True], [True, True], [True, False], [False, False]])
    mask = get_method("magnitude").select(weight, _layer(weight, 0))
    assert torch.equal(mask, expected)
    assert count_nm_violations(weight * mask, 0) == 0
    assert count_nm_violations(weight * mask, 1) == -1  # N=2 is not a multiple of 4 along axis 1


def test_ties_go_to_the_lower_index():
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0, -2.0, 2.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    mask = get_method("magnitude").select(weight, _layer(weight, 1))
    assert mask.tolist() == [[True, True, False, False, True, True, False, False, True, True, False, False]]
    assert torch.equal(mask, brute_force_mask(weight, 1, 2, 4))


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 8)])
@pytest.mark.parametrize("shape, axis", [((6, 16), 1), ((16, 5), 0), ((3, 8, 2, 3), 1), ((2, 16, 3), 1)])
def test_nm_masks_match_brute_force(n, m, shape, axis):
    generator = seeded(hash((n, m, shape, axis)) % 1000)
    weight = torch.randn(shape, generator=generator)
    weight[..., 0] = weight[..., 0].round()  # some exact ties too
    method = get_method("magnitude", n=n, m=m)
    assert (method.n, method.m) == (n, m)
    before = weight.clone()
    mask = method.select(weight, _layer(weight, axis))
    assert torch.equal(weight, before)  # methods never change the weights
    assert torch.equal(mask, brute_force_mask(weight, axis, n, m))
    assert brute_force_is_exact_nm(mask, axis, n, m)
    assert count_nm_violations(mask.float(), axis, n, m) == 0
    assert int(mask.sum()) == weight.numel() * n // m


def test_mask_on_lowered_conv_equals_mask_on_conv():
    """One mask serves the native conv ([Cout, Cin, kh, kw], axis 1) and the im2col GEMM ([Cout, kh*kw*Cin], axis 1)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(8, 6, (3, 2), padding=1)).eval()
    x = torch.randn(2, 8, 5, 5)
    conv_weight = model[0].weight.detach().clone()
    gm, _ = run_pass(LowerConvIm2col(), export_graph(model, x), (x,))
    (layer,) = find_layers(gm)
    assert layer.op == "matmul" and layer.reduction_axis == 1 and layer.reason is None
    lowered_mask = get_method("magnitude").select(get_tensor(gm, layer.weight_target), layer)
    conv_mask = get_method("magnitude").select(conv_weight, _layer(conv_weight, 1))
    assert torch.equal(lowered_mask, conv_mask.permute(0, 2, 3, 1).reshape(6, -1))


def test_unknown_method_lists_valid_names():
    with pytest.raises(SparseCompileError) as info:
        get_method("no-such-method")
    message = str(info.value)
    assert "no-such-method" in message
    for name in MASK_METHODS:
        assert name in message
    assert "magnitude" in MASK_METHODS
