"""FoldBatchNorm: BN after conv/linear/addmm folds into the layer; everything else is left alone."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from helpers import assert_same_function, count_ops, export_graph, find_nodes, randomize_batchnorm, run_pass, seeded
from sparsecompile.graph import get_tensor
from sparsecompile.passes import FoldBatchNorm

aten = torch.ops.aten
BN_OPS = {
    aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
    aten.native_batch_norm.default, aten._native_batch_norm_legit.default,
}
FORMS = pytest.mark.parametrize("decompose", [False, True], ids=["aten", "decomposed"])


class ConvBN(nn.Module):
    def __init__(self, bias=True, dims=2, affine=True, eps=1e-5, cin=4, cout=8):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.conv = conv(cin, cout, 3, padding=1, bias=bias)
        self.bn = bn(cout, affine=affine, eps=eps)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class LinearBN(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc = nn.Linear(12, 8, bias=bias)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.fc(x))


def _prepared(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = seeded(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            randomize_batchnorm(sub, generator)
    return module.eval()


def _fold(module, x, decompose):
    gm = export_graph(module, x, decompose=decompose)
    assert count_ops(gm, BN_OPS) >= 1
    return run_pass(FoldBatchNorm(), gm)


@FORMS
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv2d_bn_folds(decompose, bias):
    model = _prepared(ConvBN(bias=bias))
    x = torch.randn(2, 4, 6, 6, generator=seeded(1))
    gm, record = _fold(model, x, decompose)

    assert count_ops(gm, BN_OPS) == 0
    assert count_ops(gm, operator.getitem) == 0
    assert count_ops(gm, {aten.conv2d.default, aten.convolution.default}) == 1
    assert record.modified is True
    assert record.stats["folded"] == ["conv"]
    assert record.stats["skipped"] == {}
    conv = find_nodes(gm, {aten.conv2d.default, aten.convolution.default})[0]
    bias_node = conv.args[2]
    assert isinstance(bias_node, torch.fx.Node) and bias_node.op == "get_attr"  # a bias exists now
    assert_same_function(model, gm, (x,))
    assert_same_function(model, gm, (torch.randn(2, 4, 6, 6, generator=seeded(2)),))


@FORMS
def test_fold_matches_formula_by_hand(decompose):
    """W' = W * gamma / sqrt(var + eps) per output channel; b' = (b - mu) * s + beta."""
    model = _prepared(ConvBN(eps=0.1), seed=3)  # a large eps, so dropping or misplacing it shows
    x = torch.randn(2, 4, 5, 5, generator=seeded(4))
    gm, record = _fold(model, x, decompose)
    bn = model.bn
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + 0.1)
    expected_w = model.conv.weight.detach().double() * scale[:, None, None, None]
    expected_b = (model.conv.bias.detach().double() - bn.running_mean.double()) * scale + bn.bias.detach().double()
    torch.testing.assert_close(get_tensor(gm, "conv.weight").double(), expected_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(get_tensor(gm, "conv.bias").double(), expected_b, rtol=1e-6, atol=1e-7)
    assert get_tensor(gm, "conv.weight").dtype == torch.float32
    assert record.stats["folded"] == ["conv"]
    # what the fold removed travels in the pass's outputs, for statistics correction
    (folded,) = record.outputs.values()
    assert list(record.outputs) == ["conv.weight"] and folded.output_axis == 0 and folded.eps == 0.1
    torch.testing.assert_close(folded.scale, scale)
    torch.testing.assert_close(folded.beta, bn.bias.detach().double())
    torch.testing.assert_close(folded.running_var, bn.running_var.double())
    assert_same_function(model, gm, (x,))


@FORMS
def test_conv1d_bn_folds(decompose):
    model = _prepared(ConvBN(dims=1), seed=5)
    x = torch.randn(3, 4, 10, generator=seeded(6))
    gm, record = _fold(model, x, decompose)
    assert count_ops(gm, BN_OPS) == 0
    assert record.modified and record.stats["folded"] == ["conv"]
    assert_same_function(model, gm, (x,))


@FORMS
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_bn1d_folds(decompose, bias):
    """Before decomposition ``linear``; after it ``addmm(b, x, permute(W, [1, 0]))`` (or ``mm`` without bias)."""
    model = _prepared(LinearBN(bias=bias), seed=7)
    x = torch.randn(5, 12, generator=seeded(8))
    gm = export_graph(model, x, decompose=decompose)
    if decompose and bias:
        assert count_ops(gm, aten.addmm.default) == 1
    gm, record = run_pass(FoldBatchNorm(), gm)
    if decompose and not bias:
        # mm(x, permute(W)) has no bias slot: the BN must stay, with the reason recorded.
        assert count_ops(gm, BN_OPS) == 1
        assert record.modified is False
        assert len(record.stats["skipped"]) == 1
    else:
        assert count_ops(gm, BN_OPS) == 0
        assert record.modified and record.stats["folded"] == ["fc"]
    assert_same_function(model, gm, (x,))


@FORMS
def test_bn_without_affine_folds(decompose):
    model = _prepared(ConvBN(affine=False), seed=9)
    assert model.bn.weight is None
    x = torch.randn(2, 4, 6, 6, generator=seeded(10))
    gm, record = _fold(model, x, decompose)
    assert count_ops(gm, BN_OPS) == 0
    assert record.stats["folded"] == ["conv"]
    assert_same_function(model, gm, (x,))


class AddmmStoredInOut(nn.Module):
    """``addmm(b, x, W)`` with W stored ``[in, out]``: output channels are W's columns."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 8))
        self.b = nn.Parameter(torch.randn(8))
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(torch.addmm(self.b, x, self.w))


@FORMS
def test_addmm_with_stored_in_out_weight_folds_columns(decompose):
    model = _prepared(AddmmStoredInOut(), seed=11)
    x = torch.randn(4, 12, generator=seeded(12))
    gm, record = _fold(model, x, decompose)
    assert count_ops(gm, BN_OPS) == 0
    assert record.modified
    assert_same_function(model, gm, (x,))


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # folding would change the un-normalised branch


@FORMS
def test_conv_output_used_twice_is_not_folded(decompose):
    model = _prepared(ConvUsedTwice(), seed=13)
    x = torch.randn(2, 4, 6, 6, generator=seeded(14))
    gm, record = _fold(model, x, decompose)
    weight_before = model.conv.weight.detach().clone()
    assert count_ops(gm, BN_OPS) == 1
    assert record.modified is False
    assert record.stats["folded"] == []
    (reason,) = record.stats["skipped"].values()
    assert "used 2 times" in reason
    torch.testing.assert_close(get_tensor(gm, "conv.weight"), weight_before, rtol=0, atol=0)
    assert_same_function(model, gm, (x,))


class SharedConv(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2.0))


@FORMS
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_shared_weight_is_not_folded(decompose, bias):
    model = _prepared(SharedConv(bias=bias), seed=15)
    x = torch.randn(2, 4, 6, 6, generator=seeded(16))
    gm, record = _fold(model, x, decompose)
    assert count_ops(gm, BN_OPS) == 2
    assert record.modified is False
    reasons = list(record.stats["skipped"].values())
    assert len(reasons) == 2 and all("shared" in r for r in reasons)
    assert_same_function(model, gm, (x,))


class ConvTransposeBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(4, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.deconv(x))


@FORMS
def test_transposed_conv_is_not_folded(decompose):
    model = _prepared(ConvTransposeBN(), seed=17)
    x = torch.randn(2, 4, 5, 5, generator=seeded(18))
    gm, record = _fold(model, x, decompose)
    assert count_ops(gm, BN_OPS) == 1
    assert record.modified is False
    (reason,) = record.stats["skipped"].values()
    assert ("transposed" in reason) if decompose else ("conv_transpose" in reason)
    assert_same_function(model, gm, (x,))


def test_training_mode_batch_norm_is_not_folded():
    """A hand-set ``training=True`` BN (batch statistics) must survive the pass."""
    model = _prepared(ConvBN(), seed=19)
    x = torch.randn(4, 4, 6, 6, generator=seeded(20))
    gm = export_graph(model, x)
    (bn,) = find_nodes(gm, aten.batch_norm.default)
    args = list(bn.args)
    args[5] = True
    bn.args = tuple(args)
    gm.recompile()
    gm, record = run_pass(FoldBatchNorm(), gm)
    assert count_ops(gm, aten.batch_norm.default) == 1
    assert record.modified is False
    assert "training mode" in record.stats["skipped"][bn.name]
    model.train()  # the same function: conv followed by BN on batch statistics
    try:
        reference = model(x)
    finally:
        model.eval()
    torch.testing.assert_close(gm(x), reference, rtol=1e-5, atol=1e-5)


def test_native_batch_norm_training_form_is_not_folded():
    """``native_batch_norm(..., training=True)`` + getitem(0), as a hand-built graph."""
    model = _prepared(ConvBN(), seed=21)
    x = torch.randn(4, 4, 6, 6, generator=seeded(22))
    gm = export_graph(model, x, decompose=True)
    (bn,) = find_nodes(gm, aten._native_batch_norm_legit_no_training.default)
    inp, weight, bias, mean, var, momentum, eps = bn.args
    with gm.graph.inserting_before(bn):
        native = gm.graph.call_function(aten.native_batch_norm.default,
                                        (inp, weight, bias, mean, var, True, momentum, eps))
    bn.replace_all_uses_with(native)
    gm.graph.erase_node(bn)
    gm.recompile()
    gm, record = run_pass(FoldBatchNorm(), gm)
    assert count_ops(gm, aten.native_batch_norm.default) == 1
    assert record.modified is False
    assert "training mode" in record.stats["skipped"][native.name]


def test_batch_norm_without_running_stats_is_not_folded():
    """``track_running_stats=False`` normalises with batch statistics even in eval()."""
    model = ConvBN()
    model.bn = nn.BatchNorm2d(8, track_running_stats=False)
    model = _prepared(model, seed=23)
    x = torch.randn(4, 4, 6, 6, generator=seeded(24))
    gm, record = _fold(model, x, False)
    assert count_ops(gm, BN_OPS) == 1
    assert record.modified is False
    assert record.stats["skipped"]
    assert_same_function(model, gm, (x,))


class BNNotAfterLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(self.bn0(x))))


@FORMS
def test_bn_after_non_layer_is_not_folded(decompose):
    model = _prepared(BNNotAfterLayer(), seed=25)
    x = torch.randn(2, 4, 6, 6, generator=seeded(26))
    gm, record = _fold(model, x, decompose)
    assert count_ops(gm, BN_OPS) == 2
    assert record.modified is False
    assert len(record.stats["skipped"]) == 2
    assert_same_function(model, gm, (x,))


class Linear3dBN(nn.Module):
    """linear over the last axis of [N, C, L], BN1d over axis 1: different axes, must not fold."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.fc(x))


@FORMS
def test_linear_on_3d_input_is_not_folded(decompose):
    model = _prepared(Linear3dBN(), seed=27)
    x = torch.randn(3, 8, 8, generator=seeded(28))
    gm, record = _fold(model, x, decompose)
    assert count_ops(gm, BN_OPS) == 1
    assert record.modified is False
    assert len(record.stats["skipped"]) == 1
    assert_same_function(model, gm, (x,))


def test_mixed_graph_folds_only_eligible():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = ConvBN(cin=4, cout=4)
            self.b = ConvUsedTwice()
            self.fc = LinearBN()

        def forward(self, x):
            y = self.b(self.a(x)).mean((2, 3))
            return self.fc(torch.cat([y, y[:, :4]], 1))

    model = _prepared(Mixed(), seed=29)
    x = torch.randn(3, 4, 6, 6, generator=seeded(30))
    gm, record = _fold(model, x, False)
    assert sorted(record.stats["folded"]) == ["a.conv", "fc.fc"]
    assert len(record.stats["skipped"]) == 1
    assert count_ops(gm, BN_OPS) == 1
    assert_same_function(model, gm, (x,))


def test_bn_with_used_saved_statistics_is_not_folded():
    """A tuple-returning BN whose getitem(1) is used besides getitem(0) must stay."""
    model = _prepared(ConvBN(), seed=31)
    x = torch.randn(2, 4, 6, 6, generator=seeded(32))
    gm = export_graph(model, x, decompose=True)
    (bn,) = find_nodes(gm, aten._native_batch_norm_legit_no_training.default)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    (result,) = output.args[0]
    with gm.graph.inserting_before(output):
        saved = gm.graph.call_function(operator.getitem, (bn, 1))
        total = gm.graph.call_function(aten.sum.default, (saved,))
        combined = gm.graph.call_function(aten.add.Tensor, (result, total))
    output.args = ((combined,),)
    gm.recompile()
    gm, record = run_pass(FoldBatchNorm(), gm)
    assert count_ops(gm, BN_OPS) == 1
    assert record.modified is False
    assert "saved statistics" in record.stats["skipped"][bn.name]
    assert_same_function(model, gm, (x,))


class FunctionalConvBN(nn.Module):
    """A bias-free conv whose weight is a top-level parameter: the new bias needs a home."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4, 3, 3))
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(nn.functional.conv2d(x, self.w, padding=1))


@FORMS
def test_top_level_weight_without_bias_folds(decompose):
    model = _prepared(FunctionalConvBN(), seed=33)
    x = torch.randn(2, 4, 6, 6, generator=seeded(34))
    gm, record = _fold(model, x, decompose)
    assert count_ops(gm, BN_OPS) == 0
    assert record.stats["folded"] == ["w"]
    assert get_tensor(gm, "w_bias").shape == (8,)
    assert_same_function(model, gm, (x,))


@FORMS
def test_depthwise_conv_bn_folds(decompose):
    """The fold scales output channels (weight axis 0), so grouped convolutions fold too."""
    model = ConvBN(cin=8, cout=8)
    model.conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    model = _prepared(model, seed=35)
    x = torch.randn(2, 8, 5, 5, generator=seeded(36))
    gm, record = _fold(model, x, decompose)
    assert count_ops(gm, BN_OPS) == 0
    assert record.stats["folded"] == ["conv"]
    assert_same_function(model, gm, (x,))
