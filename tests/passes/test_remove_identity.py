"""RemoveIdentity: inference-time dropout and identity ops go; anything that changes the function stays."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from helpers import assert_same_function, count_ops, export_graph, find_nodes, run_pass, seeded
from sparsecompile.passes import RemoveIdentity

aten = torch.ops.aten
IDENTITY_LIKE = {
    aten.dropout.default, aten.native_dropout.default, aten.clone.default,
    aten.alias.default, aten.lift_fresh_copy.default, aten.feature_dropout.default,
}
FORMS = pytest.mark.parametrize("decompose", [False, True], ids=["aten", "decomposed"])


class WithDropout(nn.Module):
    def __init__(self, p=0.5):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.drop = nn.Dropout(p)
        self.drop2d = nn.Dropout2d(p)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        y = self.drop(torch.relu(self.fc1(x)))
        y = self.drop2d(y[:, :, None, None])[:, :, 0, 0]
        return self.fc2(y).clone() + torch.ops.aten.alias(x[:, :4])


@FORMS
def test_eval_dropout_clone_alias_removed(decompose):
    model = WithDropout().eval()
    x = torch.randn(3, 8, generator=seeded(0))
    gm = export_graph(model, x, decompose=decompose)
    before = count_ops(gm, IDENTITY_LIKE)
    assert before >= 3
    gm, record = run_pass(RemoveIdentity(), gm)

    assert count_ops(gm, IDENTITY_LIKE) == 0
    assert count_ops(gm, operator.getitem) == 0
    assert record.modified is True
    removed = record.stats["removed"]
    assert sum(removed.values()) == before
    assert record.stats["kept"] == []
    if not decompose:
        assert removed["dropout"] == 1 and removed["feature_dropout"] == 1
        assert removed["clone"] == 1 and removed["alias"] == 1
    else:
        assert "clone" in removed  # inference dropout decomposes to clone
    assert_same_function(model, gm, (x,), rtol=0, atol=0)  # bit for bit
    assert_same_function(model, gm, (torch.randn(3, 8, generator=seeded(1)),), rtol=0, atol=0)


def test_nothing_to_remove_is_unmodified():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    x = torch.randn(2, 8, generator=seeded(2))
    gm = export_graph(model, x)
    nodes_before = len(gm.graph.nodes)
    gm, record = run_pass(RemoveIdentity(), gm)
    assert record.modified is False
    assert record.stats == {"removed": {}, "kept": []}
    assert len(gm.graph.nodes) == nodes_before
    assert_same_function(model, gm, (x,), rtol=0, atol=0)


@FORMS
def test_training_dropout_is_kept(decompose):
    """dropout(train=True) is random: removing it would change the function."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 4)).train()
    x = torch.randn(4, 8, generator=seeded(3))
    gm = export_graph(model, x, decompose=decompose)
    dropout_ops = {aten.dropout.default, aten.native_dropout.default}
    assert count_ops(gm, dropout_ops) == 1
    gm, record = run_pass(RemoveIdentity(), gm)
    assert count_ops(gm, dropout_ops) == 1
    assert record.modified is False
    (kept,) = record.stats["kept"]
    assert "training mode" in kept
    torch.manual_seed(0)
    expected = model(x)
    torch.manual_seed(0)
    actual = gm(x)
    torch.testing.assert_close(actual, expected)  # same random stream, same dropout


@FORMS
def test_clone_with_memory_format_is_kept(decompose):
    class ToChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x).clone(memory_format=torch.channels_last).clone()

    model = ToChannelsLast().eval()
    x = torch.randn(2, 4, 3, 3, generator=seeded(4))
    gm = export_graph(model, x, decompose=decompose)
    gm, record = run_pass(RemoveIdentity(), gm)
    clones = find_nodes(gm, aten.clone.default)
    assert len(clones) == 1
    assert clones[0].kwargs["memory_format"] == torch.channels_last
    assert record.modified is True  # the plain clone went
    assert record.stats["removed"] == {"clone": 1}
    assert any("memory format" in k for k in record.stats["kept"])
    assert gm(x).is_contiguous(memory_format=torch.channels_last)
    assert_same_function(model, gm, (x,), rtol=0, atol=0)


def _native_dropout_graph(use_mask: bool, train: bool = False):
    class Net(nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1.0

    x = torch.randn(3, 5, generator=seeded(5))
    gm = export_graph(Net().eval(), x)
    (relu,) = find_nodes(gm, aten.relu.default)
    graph = gm.graph
    with graph.inserting_after(relu):
        dropout = graph.call_function(aten.native_dropout.default, (relu, 0.5, train))
    with graph.inserting_after(dropout):
        out0 = graph.call_function(operator.getitem, (dropout, 0))
    relu.replace_all_uses_with(out0)
    dropout.args = (relu, 0.5, train)  # undo the self-reference replace_all_uses_with created
    if use_mask:
        (add,) = find_nodes(gm, aten.add.Tensor)
        with graph.inserting_before(add):
            mask = graph.call_function(operator.getitem, (dropout, 1))
            as_float = graph.call_function(aten._to_copy.default, (mask,), {"dtype": torch.float32})
        with graph.inserting_after(add):
            total = graph.call_function(aten.add.Tensor, (add, as_float))
        add.replace_all_uses_with(total)
        total.args = (add, as_float)
    graph.lint()
    gm.recompile()
    return gm, x


def test_native_dropout_eval_removed():
    gm, x = _native_dropout_graph(use_mask=False)
    assert count_ops(gm, aten.native_dropout.default) == 1
    gm, record = run_pass(RemoveIdentity(), gm)
    assert count_ops(gm, aten.native_dropout.default) == 0
    assert count_ops(gm, operator.getitem) == 0
    assert record.stats["removed"] == {"native_dropout": 1}
    torch.testing.assert_close(gm(x), torch.relu(x) + 1.0, rtol=0, atol=0)


def test_native_dropout_with_used_mask_is_kept():
    gm, x = _native_dropout_graph(use_mask=True)
    expected = gm(x)
    gm, record = run_pass(RemoveIdentity(), gm)
    assert count_ops(gm, aten.native_dropout.default) == 1
    assert count_ops(gm, operator.getitem) == 2
    assert record.modified is False
    assert any("mask output is used" in k for k in record.stats["kept"])
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_native_dropout_training_is_kept():
    gm, x = _native_dropout_graph(use_mask=False, train=True)
    gm, record = run_pass(RemoveIdentity(), gm)
    assert count_ops(gm, aten.native_dropout.default) == 1
    assert record.modified is False
    assert any("training mode" in k for k in record.stats["kept"])


def test_call_module_identity_and_eval_dropout_removed():
    """torch.fx.symbolic_trace keeps nn modules as call_module nodes."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Identity(), nn.Dropout(0.3), nn.ReLU()).eval()
    gm = torch.fx.symbolic_trace(model)
    gm.eval()
    x = torch.randn(2, 8, generator=seeded(6))
    gm, record = run_pass(RemoveIdentity(), gm)
    modules = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert modules == ["0", "3"]
    assert record.stats["removed"] == {"1": 1, "2": 1}
    assert not hasattr(gm, "1") and not hasattr(gm, "2")  # unused submodules deleted
    assert_same_function(model, gm, (x,), rtol=0, atol=0)


def test_call_module_training_dropout_is_kept():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3)).train()
    gm = torch.fx.symbolic_trace(model)
    gm, record = run_pass(RemoveIdentity(), gm)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert record.modified is False
