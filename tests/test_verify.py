"""verify: the independent N:M checker and the dense-vs-sparse comparisons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers import export_graph, seeded
from sparsecompile.errors import SparseCompileError
from sparsecompile.layers import find_layers
from sparsecompile.verify import compare_outputs, count_nm_violations, flat_outputs, layer_output_errors, run_batches


def test_count_nm_violations_good_and_bad_along_axes():
    good_rows = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0],
                              [0.0, 5.0, 0.0, 6.0, 7.0, 8.0, 0.0, 0.0]])
    assert count_nm_violations(good_rows, 1) == 0
    assert count_nm_violations(good_rows, -1) == 0
    assert count_nm_violations(good_rows.t(), 0) == 0  # the same groups, seen down columns
    bad = good_rows.clone()
    bad[0, 1] = 4.0  # group [1, 4, 2, 0]: 3 nonzeros
    bad[1, 6] = 1.0  # group [7, 8, 1, 0]: 3 nonzeros
    assert count_nm_violations(bad, 1) == 2
    assert count_nm_violations(bad.t(), 0) == 2
    assert count_nm_violations(np.asarray(bad), 1) == 2  # NumPy input too
    assert count_nm_violations(torch.ones(2, 8), 1) == 4
    assert count_nm_violations(torch.ones(2, 8), 1, n=4, m=4) == 0
    assert count_nm_violations(torch.ones(2, 8), 1, n=1, m=8) == 2
    assert count_nm_violations(torch.ones(2, 6), 1) == -1  # 6 is not a multiple of 4


def test_count_nm_violations_on_conv_layout():
    """[Cout, Cin, kh, kw] along axis 1: groups are input channels at one kernel position."""
    weight = torch.zeros(2, 4, 2, 2)
    weight[:, :2] = 1.0  # channels 0, 1 kept at every position: 2:4 along axis 1
    assert count_nm_violations(weight, 1) == 0
    weight[1, 2, 1, 0] = 1.0  # one group now has 3 nonzeros
    assert count_nm_violations(weight, 1) == 1
    # flattened (cin, kh, kw) groups see something else entirely: 2 of 4 groups per row are dense
    assert count_nm_violations(weight.reshape(2, 16), 1) == 4
    assert count_nm_violations(weight.half(), 1) == 1


def test_compare_outputs_metrics_and_top1():
    reference = torch.tensor([[0.0, 1.0, 0.5], [2.0, 1.0, 0.0], [0.1, 0.2, 0.3], [1.0, 0.0, 0.0]])
    candidate = reference.clone()
    candidate[0] = torch.tensor([1.5, 1.0, 0.5])  # argmax moves 1 -> 0
    candidate[2, 2] = 0.35  # still argmax 2
    (entry,) = compare_outputs([reference], [candidate])
    assert entry["top1_agreement"] == pytest.approx(0.75)
    assert entry["max_abs_error"] == pytest.approx(1.5)
    assert entry["mean_abs_error"] == pytest.approx(1.55 / 12)
    assert entry["shape"] == [4, 3]
    expected_relative = float(torch.linalg.vector_norm(reference - candidate) / torch.linalg.vector_norm(reference))
    assert entry["relative_error"] == pytest.approx(expected_relative)
    (same,) = compare_outputs([reference], [reference.clone()])
    assert same["top1_agreement"] == 1.0 and same["max_abs_error"] == 0.0 and same["relative_error"] == 0.0


def test_compare_outputs_non_classifier_and_count_mismatch():
    entries = compare_outputs([torch.ones(3, 4, 5), torch.ones(3, 1)], [torch.ones(3, 4, 5), torch.zeros(3, 1)])
    assert all("top1_agreement" not in e for e in entries)
    assert entries[1]["max_abs_error"] == 1.0
    with pytest.raises(SparseCompileError, match="number of outputs"):
        compare_outputs([torch.ones(2)], [torch.ones(2), torch.ones(2)])


def test_run_batches_concatenates_and_flattens():
    class TwoOut(nn.Module):
        def forward(self, x):
            return {"a": x * 2, "b": (x.sum(), x[:, :1])}

    batches = [(torch.ones(2, 3),), (torch.zeros(3, 3),)]
    outputs = run_batches(TwoOut(), batches)
    assert [tuple(o.shape) for o in outputs] == [(5, 3), (2,), (5, 1)]
    assert outputs[1].tolist() == [6.0, 0.0]
    assert len(flat_outputs({"x": torch.ones(1), "y": [torch.ones(1), 3]})) == 2


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("decompose", [False, True], ids=["aten", "decomposed"])
def test_layer_output_errors(decompose):
    torch.manual_seed(0)
    model = TwoLinear().eval()
    batches = [(torch.randn(4, 8, generator=seeded(1)),), (torch.randn(3, 8, generator=seeded(2)),)]
    gm = export_graph(model, batches[0][0], decompose=decompose, dynamic_batch=True)
    layers = find_layers(gm)
    assert [layer.name for layer in layers] == ["fc1", "fc2"]

    all_true = {layer.weight_target: torch.ones(layer.weight_shape, dtype=torch.bool) for layer in layers}
    assert layer_output_errors(gm, layers, all_true, batches) == {"fc1": 0.0, "fc2": 0.0}

    masks = {layer.weight_target: torch.rand(layer.weight_shape, generator=seeded(3)) > 0.5 for layer in layers}
    errors = layer_output_errors(gm, layers, masks, batches)
    assert set(errors) == {"fc1", "fc2"} and all(e > 0 for e in errors.values())

    # by hand: each layer sees the DENSE model's activations, error relative to the dense output
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        hidden = torch.relu(model.fc1(x))
        for name, inputs, layer in [("fc1", x, model.fc1), ("fc2", hidden, model.fc2)]:
            dense = layer(inputs)
            sparse = nn.functional.linear(inputs, layer.weight * masks[f"{name}.weight"], layer.bias)
            expected = float(torch.linalg.vector_norm(dense - sparse) / torch.linalg.vector_norm(dense))
            assert errors[name] == pytest.approx(expected, rel=1e-4)

    only_fc2 = {"fc2.weight": masks["fc2.weight"]}
    assert set(layer_output_errors(gm, layers, only_fc2, batches)) == {"fc2"}
    # the graph itself still computes the dense function
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_layer_output_errors_conv():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)).eval()
    x = torch.randn(2, 4, 5, 5, generator=seeded(5))
    gm = export_graph(model, x)
    layers = find_layers(gm)
    ones = {"0.weight": torch.ones(8, 4, 3, 3, dtype=torch.bool)}
    assert layer_output_errors(gm, layers, ones, [(x,)]) == {"0": 0.0}
    half = ones["0.weight"].clone()
    half[:, :2] = False
    assert layer_output_errors(gm, layers, {"0.weight": half}, [(x,)])["0"] > 0.1
