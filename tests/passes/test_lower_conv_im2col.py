"""LowerConvIm2col: conv2d -> im2col + GEMM with the reduction axis ordered (kh, kw, cin)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_same_function, count_ops, export_graph, find_nodes, run_pass, seeded
from sparsecompile.graph import CONV_OPS, get_tensor
from sparsecompile.passes import LowerConvIm2col, PassContext, PassManager, ShapePropagation

aten = torch.ops.aten
FORMS = pytest.mark.parametrize("decompose", [False, True], ids=["aten", "decomposed"])
ANY_CONV = CONV_OPS | {aten.conv_transpose2d.input, aten.conv2d.padding}
TOL = dict(rtol=1e-4, atol=1e-5)


class Conv(nn.Module):
    def __init__(self, cin=4, cout=6, kernel=3, bias=True, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, bias=bias, **kwargs)

    def forward(self, x):
        return torch.relu(self.conv(x))


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Conv(**kwargs).eval()


VARIANTS = [
    dict(kernel=3, padding=1),
    dict(kernel=3, stride=2),
    dict(kernel=(3, 2), padding=(1, 0), stride=(2, 1)),
    dict(kernel=3, padding=2, dilation=2),
    dict(kernel=(2, 3), padding=(2, 1), dilation=(2, 1), stride=(1, 2), bias=False),
    dict(kernel=1, cin=8, cout=4, bias=False),
]


@FORMS
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}{v[k]}" for k in v))
def test_lowered_conv_is_same_function(decompose, variant):
    model = _model(**variant)
    x = torch.randn(2, model.conv.in_channels, 9, 8, generator=seeded(1))
    original_weight = model.conv.weight.detach().clone()
    gm = export_graph(model, x, decompose=decompose)
    assert count_ops(gm, CONV_OPS) == 1
    (conv,) = find_nodes(gm, CONV_OPS)
    gm, record = run_pass(LowerConvIm2col(), gm, (x,))

    assert count_ops(gm, CONV_OPS) == 0
    assert count_ops(gm, aten.im2col.default) == 1
    assert count_ops(gm, aten.matmul.default) == 1
    assert count_ops(gm, aten.add.Tensor) == (1 if model.conv.bias is not None else 0)
    assert record.modified is True
    assert record.stats == {"lowered": [conv.name], "skipped": {}}

    cout, cin, kh, kw = original_weight.shape
    lowered = get_tensor(gm, "conv.weight")
    assert lowered.shape == (cout, kh * kw * cin)
    assert torch.equal(lowered, original_weight.permute(0, 2, 3, 1).reshape(cout, -1))
    assert_same_function(model, gm, (x,), **TOL)
    assert_same_function(model, gm, (torch.randn(2, cin, 9, 8, generator=seeded(2)),), **TOL)


def test_reduction_axis_order_is_kh_kw_cin():
    """Column j of the lowered weight is W[:, j % Cin, (j // Cin) // kw, (j // Cin) % kw]."""
    model = _model(kernel=(2, 3), cin=4, cout=2)
    x = torch.randn(1, 4, 5, 5, generator=seeded(3))
    weight = model.conv.weight.detach().clone()
    gm, _ = run_pass(LowerConvIm2col(), export_graph(model, torch.cat([x, x])), (torch.cat([x, x]),))
    lowered = get_tensor(gm, "conv.weight")
    for j in range(lowered.shape[1]):
        cin, position = j % 4, j // 4
        torch.testing.assert_close(lowered[:, j], weight[:, cin, position // 3, position % 3], rtol=0, atol=0)


@pytest.mark.parametrize("decompose", [False, True], ids=["aten", "decomposed"])
def test_dynamic_batch(decompose):
    model = _model(kernel=3, padding=1, stride=2, cin=8, cout=4)
    x = torch.randn(2, 8, 7, 7, generator=seeded(4))
    gm = export_graph(model, x, decompose=decompose, dynamic_batch=True)
    gm, record = run_pass(LowerConvIm2col(), gm, (x,))
    assert record.modified and not record.stats["skipped"]
    for batch in (1, 5):
        assert_same_function(model, gm, (torch.randn(batch, 8, 7, 7, generator=seeded(batch)),), **TOL)


def test_after_shape_propagation_in_a_pipeline():
    model = _model(kernel=3, padding=1)
    x = torch.randn(3, 4, 6, 6, generator=seeded(5))
    gm = export_graph(model, x, dynamic_batch=True)
    manager = PassManager([ShapePropagation(), LowerConvIm2col(), ShapePropagation()])
    gm = manager.run(gm, PassContext(example_inputs=(x,)))
    assert [r.name for r in manager.records] == ["shape_prop", "lower_conv_im2col", "shape_prop"]
    assert manager.records[1].modified
    (matmul,) = find_nodes(gm, aten.matmul.default)
    assert tuple(matmul.meta["tensor_meta"].shape) == (3, 6, 36)
    assert_same_function(model, gm, (torch.randn(4, 4, 6, 6, generator=seeded(6)),), **TOL)


class Skips(nn.Module):
    """One conv per negative case, none of which may be lowered."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.cin6 = nn.Conv2d(6, 8, 3, padding=1)
        self.transposed = nn.ConvTranspose2d(8, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.depthwise(self.grouped(x))
        y = self.cin6(y[:, :6])
        y = self.transposed(y)
        y = self.shared(self.shared(y))
        return self.conv1d(y.flatten(2))


@FORMS
def test_ineligible_convs_are_left_alone_with_reasons(decompose):
    torch.manual_seed(7)
    model = Skips().eval()
    x = torch.randn(2, 8, 5, 5, generator=seeded(8))
    gm = export_graph(model, x, decompose=decompose)
    convs_before = count_ops(gm, ANY_CONV)
    assert convs_before == 7
    weights_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    gm, record = run_pass(LowerConvIm2col(), gm, (x,))

    assert count_ops(gm, ANY_CONV) == convs_before
    assert count_ops(gm, aten.im2col.default) == 0
    assert record.modified is False
    assert record.stats["lowered"] == []
    reasons = list(record.stats["skipped"].values())
    assert any("groups=2" in r for r in reasons)
    assert any("groups=8" in r for r in reasons)
    assert any("Cin=6 is not a multiple of 4" in r for r in reasons)
    assert sum("shared" in r for r in reasons) == 2
    assert any("1-D convolution" in r for r in reasons)
    if decompose:  # before decomposition these are separate ops the pass does not match
        assert any("transposed" in r for r in reasons)
    for name, value in weights_before.items():
        assert torch.equal(get_tensor(gm, name), value), name
    assert_same_function(model, gm, (x,), rtol=0, atol=0)


def test_alignment_option():
    model = _model(cin=4, kernel=1)
    x = torch.randn(2, 4, 3, 3, generator=seeded(9))
    gm, record = run_pass(LowerConvIm2col(alignment=8), export_graph(model, x), (x,))
    assert record.modified is False
    assert "Cin=4 is not a multiple of 8" in next(iter(record.stats["skipped"].values()))
    assert count_ops(gm, aten.im2col.default) == 0


def test_unknown_output_shape_is_skipped():
    model = _model(kernel=3)
    x = torch.randn(2, 4, 6, 6, generator=seeded(10))
    gm = export_graph(model, x)
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
        node.meta.pop("tensor_meta", None)
    gm, record = run_pass(LowerConvIm2col(), gm, (x,))
    assert record.modified is False
    assert "shape propagation" in next(iter(record.stats["skipped"].values()))
    assert_same_function(model, gm, (x,), rtol=0, atol=0)


def test_dynamic_spatial_size_is_not_baked_in():
    """With a symbolic H the output size is unknown: skip rather than emit views over SymInts."""
    model = _model(kernel=3, cin=4, cout=8)
    x = torch.randn(2, 4, 8, 8, generator=seeded(11))
    batch, height = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("height", min=4, max=64)
    gm = torch.export.export(model, (x,), dynamic_shapes=({0: batch, 2: height},)).module()
    gm, record = run_pass(LowerConvIm2col(), gm, (x,))
    assert record.modified is False
    assert count_ops(gm, aten.im2col.default) == 0
    assert "output spatial size unknown" in next(iter(record.stats["skipped"].values()))
    assert_same_function(model, gm, (torch.randn(3, 4, 11, 8, generator=seeded(12)),), **TOL)


@FORMS
def test_string_padding(decompose):
    """``padding='same'`` is its own overload before decomposition (left alone), numeric after it (lowered)."""
    torch.manual_seed(13)
    model = Conv(cin=4, cout=4, kernel=3, padding="same").eval()
    x = torch.randn(2, 4, 6, 7, generator=seeded(14))
    gm = export_graph(model, x, decompose=decompose)
    gm, record = run_pass(LowerConvIm2col(), gm, (x,))
    assert record.modified is decompose
    assert count_ops(gm, aten.conv2d.padding) == (0 if decompose else 1)
    assert count_ops(gm, aten.im2col.default) == (1 if decompose else 0)
    assert_same_function(model, gm, (x,), **TOL)
