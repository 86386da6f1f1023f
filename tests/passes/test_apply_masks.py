"""ApplyMasks: the one pass that changes the function -- kept weights bit for bit, dropped ones +0.0."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import assert_same_function, export_graph, run_pass, seeded
from sparsecompile.errors import SparseCompileError
from sparsecompile.graph import get_tensor
from sparsecompile.layers import find_layers
from sparsecompile.masks import get_method
from sparsecompile.passes import ApplyMasks
from sparsecompile.verify import count_nm_violations

FORMS = pytest.mark.parametrize("decompose", [False, True], ids=["aten", "decomposed"])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _random_masks(model, generator):
    return {
        "conv.weight": torch.rand(model.conv.weight.shape, generator=generator) > 0.5,
        "fc.weight": torch.rand(model.fc.weight.shape, generator=generator) > 0.5,
    }


@FORMS
def test_masks_zero_dropped_weights_and_keep_the_rest(decompose):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(3, 4, 5, 5, generator=seeded(1))
    gm = export_graph(model, x, decompose=decompose)
    code_before = gm.code
    masks = _random_masks(model, seeded(2))
    gm, record = run_pass(ApplyMasks(masks), gm)

    assert record.modified is True
    assert record.stats == {"layers": 2, "zeroed_weights": int(sum((~m).sum() for m in masks.values()))}
    assert gm.code == code_before  # structure unchanged, only tensors
    for target, mask in masks.items():
        dense = get_tensor(model, target).detach()
        sparse = get_tensor(gm, target)
        assert isinstance(sparse, nn.Parameter)
        assert torch.equal(sparse[mask], dense[mask])  # kept: bit for bit
        assert torch.all(sparse[~mask] == 0) and not torch.signbit(sparse[~mask]).any()  # dropped: +0.0
    # bias and the original module are untouched
    assert torch.equal(get_tensor(gm, "conv.bias"), model.conv.bias.detach())
    assert (model.conv.weight != 0).all()

    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.conv.weight.mul_(masks["conv.weight"])
        reference.fc.weight.mul_(masks["fc.weight"])
    assert_same_function(reference, gm, (x,), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model(x), gm(x), atol=1e-3)  # the function did change


def test_magnitude_masks_through_find_layers_are_exactly_2_4():
    torch.manual_seed(3)
    model = Net().eval()
    x = torch.randn(2, 4, 5, 5, generator=seeded(4))
    gm = export_graph(model, x)
    method = get_method("magnitude")
    layers = [layer for layer in find_layers(gm) if layer.reason is None]
    assert {layer.name for layer in layers} == {"conv", "fc"}
    masks = {layer.weight_target: method.select(get_tensor(gm, layer.weight_target), layer) for layer in layers}
    gm, record = run_pass(ApplyMasks(masks), gm)
    assert record.stats["zeroed_weights"] == (8 * 4 * 9 + 8 * 8) // 2
    for layer in layers:
        weight = get_tensor(gm, layer.weight_target)
        assert count_nm_violations(weight, layer.reduction_axis) == 0
        assert int((weight != 0).sum()) == weight.numel() // 2


def test_no_masks_is_unmodified():
    torch.manual_seed(5)
    model = Net().eval()
    x = torch.randn(2, 4, 5, 5, generator=seeded(6))
    gm, record = run_pass(ApplyMasks({}), export_graph(model, x))
    assert record.modified is False
    assert record.stats == {"layers": 0, "zeroed_weights": 0}
    assert_same_function(model, gm, (x,), rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_bad_mask_fails_naming_the_pass(bad):
    torch.manual_seed(7)
    model = Net().eval()
    gm = export_graph(model, torch.randn(2, 4, 5, 5))
    mask = torch.ones(8, 8, dtype=torch.bool) if bad == "shape" else torch.ones(8, 4, 3, 3)
    with pytest.raises(SparseCompileError, match=r"pass 'apply_masks' failed: ValueError: mask for 'conv.weight'"):
        run_pass(ApplyMasks({"conv.weight": mask}), gm)
    assert torch.equal(get_tensor(gm, "conv.weight"), model.conv.weight.detach())


class Constants(nn.Module):
    """A parameter, a buffer and a plain tensor attribute (a lifted constant) as GEMM operands."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(8, 8))
        self.register_buffer("b", torch.randn(8, 8))
        self.c = torch.randn(8, 4)

    def forward(self, x):
        return ((x @ self.p) @ self.b) @ self.c


@FORMS
def test_masks_on_buffers_and_constants(decompose):
    torch.manual_seed(8)
    model = Constants().eval()
    x = torch.randn(3, 8, generator=seeded(9))
    gm = export_graph(model, x, decompose=decompose)
    layers = find_layers(gm)
    assert [(layer.weight_target, layer.reduction_axis) for layer in layers] == [("p", 0), ("b", 0), ("c", 0)]
    method = get_method("magnitude")
    masks = {layer.weight_target: method.select(get_tensor(gm, layer.weight_target), layer) for layer in layers}
    gm, record = run_pass(ApplyMasks(masks), gm)
    assert record.stats["zeroed_weights"] == (64 + 64 + 32) // 2
    assert isinstance(get_tensor(gm, "p"), nn.Parameter)
    assert "b" in dict(gm.named_buffers())
    for layer in layers:
        assert count_nm_violations(get_tensor(gm, layer.weight_target), 0) == 0
    with torch.no_grad():
        expected = ((x @ (model.p * masks["p"])) @ (model.b * masks["b"])) @ (model.c * masks["c"])
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
