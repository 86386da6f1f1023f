"""ShapePropagation: annotates every value with its shape and dtype and changes nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_same_function, export_graph, run_pass, seeded
from sparsecompile.errors import SparseCompileError
from sparsecompile.graph import node_shape
from sparsecompile.passes import PassContext, PassManager, ShapePropagation

FORMS = pytest.mark.parametrize("decompose", [False, True], ids=["aten", "decomposed"])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.mean((2, 3))), y


def _by_name(gm):
    return {n.name: n for n in gm.graph.nodes}


@FORMS
def test_annotates_every_tensor_value(decompose):
    model = Net().eval()
    x = torch.randn(3, 4, 10, 10, generator=seeded(0))
    gm = export_graph(model, x, decompose=decompose)
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    code_before = gm.code
    gm, record = run_pass(ShapePropagation(), gm, (x,))

    assert record.modified is False
    assert gm.code == code_before
    annotated = [n for n in gm.graph.nodes if "tensor_meta" in n.meta]
    assert record.stats["annotated_nodes"] == len(annotated)
    # every placeholder, weight and op that yields a tensor is annotated
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr") or (node.op == "call_function" and "val" in node.meta):
            assert "tensor_meta" in node.meta, node.name
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 1
    assert convs[0].meta["tensor_meta"].shape == torch.Size([3, 8, 5, 5])
    assert convs[0].meta["tensor_meta"].dtype == torch.float32
    outputs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert node_shape(outputs[0]) == (3, 5)
    assert node_shape(outputs[1]) == (3, 8, 5, 5)
    assert_same_function(model, gm, (x,), rtol=0, atol=0)


def test_dynamic_batch_annotated_with_example_batch():
    model = Net().eval()
    x = torch.randn(2, 4, 8, 8, generator=seeded(1))
    gm = export_graph(model, x, dynamic_batch=True)
    conv = [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)][0]
    assert node_shape(conv) == (-1, 8, 4, 4)  # symbolic batch before shape propagation
    example = torch.randn(6, 4, 8, 8, generator=seeded(2))
    gm, record = run_pass(ShapePropagation(), gm, (example,))
    assert node_shape(conv) == (6, 8, 4, 4)
    assert record.stats["annotated_nodes"] > 0
    assert_same_function(model, gm, (example,), rtol=0, atol=0)


def test_wrong_example_inputs_name_the_pass():
    gm = export_graph(Net().eval(), torch.randn(2, 4, 8, 8))
    with pytest.raises(SparseCompileError, match="pass 'shape_prop' failed"):
        PassManager([ShapePropagation()]).run(gm, PassContext(example_inputs=(torch.randn(2, 3, 8, 8),)))
