"""PassManager: runs passes in order, lints and recompiles after each, names the failing pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_same_function, count_ops, export_graph, seeded
from sparsecompile.errors import SparseCompileError
from sparsecompile.passes import (
    FoldBatchNorm, PassContext, PassManager, PassResult, RemoveIdentity, ShapePropagation,
)

aten = torch.ops.aten


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.drop(torch.relu(self.bn(self.conv(x))))


def _model():
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model.eval()


class Raises:
    name = "explode"

    def __init__(self, exc):
        self.exc = exc

    def __call__(self, gm, context):
        raise self.exc


class BreaksGraph:
    """Leaves a node that uses a value defined after it: only lint catches this."""

    name = "break_graph"

    def __call__(self, gm, context):
        relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
        with gm.graph.inserting_before(relu.args[0]):
            gm.graph.call_function(aten.neg.default, (relu,))
        return PassResult(gm, True, {})


class NegateOutputWithoutRecompile:
    name = "negate_output"

    def __call__(self, gm, context):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        (value,) = output.args[0]
        with gm.graph.inserting_before(output):
            negated = gm.graph.call_function(aten.neg.default, (value,))
        output.args = ((negated,),)
        return PassResult(gm, True, {"negated": 1})


def test_runs_in_order_and_keeps_records():
    model = _model()
    x = torch.randn(2, 4, 6, 6, generator=seeded(1))
    seen = []
    manager = PassManager([RemoveIdentity(), FoldBatchNorm(), ShapePropagation()], on_pass=seen.append)
    gm = manager.run(export_graph(model, x), PassContext(example_inputs=(x,)))

    assert seen == ["remove_identity", "fold_batchnorm", "shape_prop"]
    assert [r.name for r in manager.records] == seen
    assert [r.modified for r in manager.records] == [True, True, False]
    assert manager.records[0].stats["removed"] == {"dropout": 1}
    assert manager.records[1].stats["folded"] == ["conv"]
    assert manager.records[2].stats["annotated_nodes"] > 0
    assert all(r.seconds >= 0 for r in manager.records)
    # what a pass produced besides the graph comes back from the run, not off the pass object
    assert list(manager.outputs("fold_batchnorm")) == ["conv.weight"]
    assert manager.records[1].outputs is manager.outputs("fold_batchnorm")
    assert manager.outputs("remove_identity") is None and manager.outputs("shape_prop") is None
    with pytest.raises(KeyError, match="lower_conv_im2col"):
        manager.outputs("lower_conv_im2col")
    assert count_ops(gm, {aten.dropout.default, aten.batch_norm.default}) == 0
    assert_same_function(model, gm, (x,))


def test_recompiles_after_each_pass():
    model = _model()
    x = torch.randn(2, 4, 6, 6, generator=seeded(2))
    manager = PassManager([NegateOutputWithoutRecompile()])
    gm = manager.run(export_graph(model, x), PassContext())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), -model(x))
    assert manager.records[0].stats == {"negated": 1}


@pytest.mark.parametrize("exc, expected", [
    (RuntimeError("shape mismatch\nlong traceback line"), "pass 'explode' failed: RuntimeError: shape mismatch"),
    (SparseCompileError("weights are odd"), "pass 'explode' failed: weights are odd"),
])
def test_failing_pass_is_named(exc, expected):
    model = _model()
    x = torch.randn(2, 4, 6, 6)
    manager = PassManager([RemoveIdentity(), Raises(exc), ShapePropagation()])
    with pytest.raises(SparseCompileError) as info:
        manager.run(export_graph(model, x), PassContext(example_inputs=(x,)))
    message = str(info.value)
    assert message.startswith(expected)
    assert "long traceback line" not in message  # one line only
    assert info.value.__cause__ is exc
    # passes before the failure keep their records; nothing after it ran
    assert [r.name for r in manager.records] == ["remove_identity"]


def test_broken_graph_is_caught_by_lint_and_named():
    model = _model()
    x = torch.randn(2, 4, 6, 6)
    manager = PassManager([FoldBatchNorm(), BreaksGraph()])
    with pytest.raises(SparseCompileError, match="pass 'break_graph' failed"):
        manager.run(export_graph(model, x), PassContext())
    assert [r.name for r in manager.records] == ["fold_batchnorm"]
