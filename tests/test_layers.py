"""find_layers: which nodes are GEMM-like layers, their reduction axis, and why some stay dense."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import export_graph
from sparsecompile.layers import find_layers, unmatched_patterns

FORMS = pytest.mark.parametrize("decompose", [False, True], ids=["aten", "decomposed"])


def _layers(module, *inputs, decompose=False, **kwargs):
    return {layer.name: layer for layer in find_layers(export_graph(module.eval(), *inputs, decompose=decompose),
                                                        **kwargs)}


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(8, 12, 3, padding=1)
        self.conv2d = nn.Conv2d(4, 16, (3, 2))

    def forward(self, signal, image):
        return self.conv1d(signal), self.conv2d(image)


@FORMS
def test_conv_reduction_axis_is_input_channels(decompose):
    layers = _layers(Convs(), torch.randn(2, 8, 10), torch.randn(2, 4, 6, 6), decompose=decompose)
    assert set(layers) == {"conv1d", "conv2d"}
    for name, shape in [("conv1d", (12, 8, 3)), ("conv2d", (16, 4, 3, 2))]:
        layer = layers[name]
        assert layer.reason is None
        assert layer.weight_target == f"{name}.weight"
        assert layer.weight_shape == shape
        assert layer.reduction_axis == 1
        assert layer.reduction_size == shape[1]
        assert layer.numel == torch.Size(shape).numel()
        assert layer.op == ("convolution" if decompose else name)


@FORMS
def test_linear_reduction_axis(decompose):
    """linear W[out, in]: axis 1; after decomposition addmm(b, x, permute(W, [1, 0])) maps back to axis 1."""
    layers = _layers(nn.Sequential(nn.Linear(12, 8)), torch.randn(3, 12), decompose=decompose)
    (layer,) = layers.values()
    assert layer.name == "0"
    assert layer.op == ("addmm" if decompose else "linear")
    assert layer.weight_shape == (8, 12)
    assert layer.reduction_axis == 1 and layer.reduction_size == 12
    assert layer.reason is None


class ConstRight(nn.Module):
    """x[N, K] @ W[K, N']: the constant is the right operand, reduction along its axis 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 8))

    def forward(self, x):
        return x @ self.w


class ConstLeft(nn.Module):
    """W[M, K] @ x[K, N]: the constant is the left operand, reduction along its axis 1."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(20, 12))

    def forward(self, x):
        return self.w @ x


class Transposed(nn.Module):
    """x @ W.t() and x @ W.transpose(0, 1) with W stored [N', K]: reduction along the stored axis 1."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(8, 12))
        self.b = nn.Parameter(torch.randn(8, 12))

    def forward(self, x):
        return x @ self.a.t() + x @ self.b.transpose(0, 1)


class TransposeSpellings(nn.Module):
    """W.T, W.mT and swapaxes: other ways users spell the transpose of a [N', K] weight."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.randn(8, 12))
        self.d = nn.Parameter(torch.randn(8, 12))
        self.e = nn.Parameter(torch.randn(8, 12))

    def forward(self, x):
        return x @ self.c.T + x @ self.d.mT + x @ self.e.swapaxes(0, 1)


class AddmmStored(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 8))
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.w)


@FORMS
@pytest.mark.parametrize("module, x, expected", [
    (ConstRight(), torch.randn(3, 12), {"w": ((12, 8), 0)}),
    (ConstLeft(), torch.randn(12, 5), {"w": ((20, 12), 1)}),
    (Transposed(), torch.randn(3, 12), {"a": ((8, 12), 1), "b": ((8, 12), 1)}),
    (TransposeSpellings(), torch.randn(3, 12), {"c": ((8, 12), 1), "d": ((8, 12), 1), "e": ((8, 12), 1)}),
    (AddmmStored(), torch.randn(3, 12), {"w": ((12, 8), 0)}),
], ids=["right", "left", "transposed", "transpose-spellings", "addmm"])
def test_matmul_constant_operand_axis(decompose, module, x, expected):
    layers = _layers(module, x, decompose=decompose)
    assert {name: (layer.weight_shape, layer.reduction_axis) for name, layer in layers.items()} == expected
    for layer in layers.values():
        assert layer.reason is None
        assert layer.reduction_size == 12  # the contracted dimension, whichever side the weight is on


class BothConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("p", torch.randn(8, 12))
        self.register_buffer("q", torch.randn(12, 4))

    def forward(self, x):
        return x + (self.p @ self.q).sum()


def test_both_operands_constant_is_listed_with_reason():
    layers = list(find_layers(export_graph(BothConstant().eval(), torch.randn(3))))
    assert len(layers) == 1
    assert layers[0].reason == "both operands are constants"
    assert layers[0].weight_target is None


def test_activation_times_activation_is_not_a_layer():
    class Bilinear(nn.Module):
        def forward(self, a, b):
            return a @ b

    assert find_layers(export_graph(Bilinear(), torch.randn(3, 4), torch.randn(4, 5))) == []


class Skips(nn.Module):
    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.cin6 = nn.Conv2d(6, 8, 1)
        self.transposed = nn.ConvTranspose2d(8, 8, 3, padding=1)
        self.shared = nn.Linear(8, 8)
        self.k6 = nn.Linear(6, 8)
        self.conv3d = nn.Conv3d(8, 8, 1)
        self.ok = nn.Linear(8, 8)

    def forward(self, x):
        y = self.grouped(self.depthwise(x))
        y = self.transposed(self.cin6(y[:, :6]))
        z = self.conv3d(y[:, :, None]).mean((2, 3, 4))
        z = self.shared(self.shared(z))
        return self.ok(self.k6(z[:, :6]))


@FORMS
def test_skip_reasons(decompose):
    layers = find_layers(export_graph(Skips().eval(), torch.randn(2, 8, 5, 5), decompose=decompose))
    reasons = {layer.name: layer.reason for layer in layers}
    assert reasons["depthwise"] == "depthwise convolution"
    assert reasons["grouped"] == "grouped convolution (groups=2)"
    assert reasons["cin6"] == "Cin=6 is not a multiple of 4"
    assert reasons["k6"] == "K=6 is not a multiple of 4"
    assert "3-D convolution" in reasons["conv3d"]
    shared = [layer for layer in layers if layer.weight_target == "shared.weight"]
    assert len(shared) == 2
    assert len({layer.name for layer in shared}) == 2  # made unique with the node name
    assert all(layer.name.startswith("shared@") for layer in shared)
    assert all("shared by 2 uses" in layer.reason for layer in shared)
    assert reasons["ok"] is None
    assert reasons["transposed"] == "transposed convolution"
    assert [layer.name for layer in layers if layer.reason is None] == ["ok"]


def test_exclude_and_min_weights():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    gm = export_graph(model.eval(), torch.randn(2, 16))
    layers = {layer.name: layer for layer in find_layers(gm, exclude=[r"^2$", r"nomatch"], min_weights=100)}
    assert layers["0"].reason is None
    assert layers["2"].reason == "excluded by --exclude"
    assert layers["4"].reason == "only 32 weights (< --min-weights 100)"
    assert unmatched_patterns(list(layers.values()), [r"^2$", r"nomatch", r"\d"]) == ["nomatch"]
    assert all(layer.reason is None for layer in find_layers(gm))


def test_pattern_and_alignment_set_the_step():
    gm = export_graph(nn.Sequential(nn.Linear(12, 8)).eval(), torch.randn(2, 12))
    assert find_layers(gm)[0].reason is None
    assert find_layers(gm, n=4, m=8)[0].reason == "K=12 is not a multiple of 8"
    assert find_layers(gm, alignment=16)[0].reason == "K=12 is not a multiple of 16"
