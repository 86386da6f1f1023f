"""The back-substituted margin bounds of certify (analysis/crown.py) and the relaxations they rest on.

* Every linear relaxation of an elementwise op holds on its whole input box (random dense values and boxes,
  small to huge, every candidate slope), by brute force.
* On every op-family model (BatchNorm kept/decomposed/folded, depthwise/grouped convs, hard-swish / SiLU /
  GELU / hard-sigmoid gating, pooling, concat, reshapes, two outputs, residual adds with in-place ReLU,
  layer norm and softmax) and many random 2:4 masks, including deliberately damaging ones: per sample, the
  sparse model's smallest margin over the dense top-1 class is at least the bound's (``crown_margin``), a
  certified sample never changes its prediction, and small changes are certified.
* An op without a relaxation (layer norm, softmax) stops the back-substitution at its box and is named.
* An in-place activation (``nn.ReLU(inplace=True)``) is relaxed around its dense *input*, as the
  out-of-place one is.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from helpers import export_graph, seeded
from sparsecompile.analysis.certify import certify
from sparsecompile.analysis.crown import unary_relaxation
from sparsecompile.graph import set_tensor
from sparsecompile.layers import find_layers
from sparsecompile.verify import flat_outputs
from test_certify import Zoo, _res_cnn
from test_certify_ops import FAMILIES, _export, _inputs, _mild, _random_masks, _weights, assert_sound

aten = torch.ops.aten

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_RELAXED = [aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.leaky_relu.default,
            aten.hardsigmoid.default, aten.abs.default, aten.hardswish.default, aten.sigmoid.default,
            aten.tanh.default, aten.silu.default, aten.gelu.default, aten.softplus.default, aten.erf.default,
            aten.mish.default]


@pytest.mark.parametrize("target", _RELAXED, ids=str)
def test_every_relaxation_holds_on_its_box(target):
    g = seeded(1)
    node = types.SimpleNamespace(target=target, args=(types.SimpleNamespace(name="x"),), kwargs={})
    count = 3000
    for scale in (0.0, 1e-3, 0.1, 1.0, 5.0, 100.0):
        d = torch.randn(count, dtype=torch.float64, generator=g) * 3
        c = torch.randn(count, dtype=torch.float64, generator=g) * scale
        r = torch.rand(count, dtype=torch.float64, generator=g) * scale
        candidates, finite, base = unary_relaxation(node, d, (c, r))
        assert bool(finite.all())
        for _ in range(4):
            t = c + (2 * torch.rand(count, dtype=torch.float64, generator=g) - 1) * r
            pick = torch.rand(count, generator=g, dtype=torch.float64)
            t = torch.where(pick < 0.15, c + r, torch.where(pick < 0.3, c - r, t))  # the box's ends
            actual = target(d + t) - base
            for alpha, low, high in candidates:
                assert float((alpha * t + low - actual).max()) <= 1e-12
                assert float((actual - alpha * t - high).max()) <= 1e-12


def test_a_point_box_gives_an_exact_relaxation():
    """No uncertainty in, none out: a flipped ReLU is relaxed exactly, not charged a radius."""
    d = torch.tensor([-1.0, 2.0, 0.5], dtype=torch.float64)
    t = torch.tensor([1.5, -3.0, 0.25], dtype=torch.float64)
    node = types.SimpleNamespace(target=aten.relu.default, args=(types.SimpleNamespace(name="x"),), kwargs={})
    candidates, _, base = unary_relaxation(node, d, (t, torch.zeros_like(t)))
    exact = torch.relu(d + t) - base
    for alpha, low, high in candidates:
        assert torch.allclose(alpha * t + low, exact, atol=1e-9) and torch.allclose(alpha * t + high, exact, atol=1e-9)


# ---------------------------------------------------------------------------------------------- models


def _model(family: str):
    x = torch.randn(4, 4, 8, 8)
    if family == "residual-inplace":
        return export_graph(_res_cnn(0), x, dynamic_batch=True), (4, 8, 8)
    if family == "layernorm-softmax":
        torch.manual_seed(0)
        return export_graph(Zoo().eval(), x, dynamic_batch=True), (4, 8, 8)
    return _export(family)


def _damage(gm, seed: int) -> None:
    """Random 2:4 masks, then every weight scaled by 1 + N(0, 0.5) and a tenth of the entries negated."""
    _random_masks(gm, seed)
    g = seeded(seed + 100)
    for name, w in _weights(gm):
        factor = 1 + 0.5 * torch.randn(w.shape, generator=g)
        flip = torch.where(torch.rand(w.shape, generator=g) < 0.1, -1.0, 1.0)
        set_tensor(gm, name, w.detach() * factor * flip)


def _check_margins(result: dict, dense_gm, sparse_gm, batches, output: int):
    """Per sample: min over j != top of the sparse margin z_s[top] - z_s[j] >= the certified margin."""
    with torch.no_grad():
        z_d = torch.cat([flat_outputs(dense_gm(b))[output] for b in batches]).double()
        z_s = torch.cat([flat_outputs(sparse_gm(b))[output] for b in batches]).double()
    top = z_d.argmax(1)
    actual = z_s.gather(1, top[:, None]) - z_s
    actual.scatter_(1, top[:, None], float("inf"))
    actual = actual.amin(1)
    bound = torch.tensor(result["samples"]["crown_margin"], dtype=torch.float64)
    if result["summary"]["certified_margin_of"] != ["output"]:  # margins of the logits behind a softmax
        return bound, None
    slack = 1e-5 * (1 + z_d.abs().amax(1))
    assert bool((actual >= bound - slack).all()), float((bound - slack - actual).max())
    return bound, slack


@pytest.mark.parametrize("family", FAMILIES + ["residual-inplace", "layernorm-softmax"])
def test_margin_bound_holds_and_certified_predictions_never_flip(family):
    dense, shape = _model(family)
    batches = _inputs(shape, samples=128)
    shares = {}
    for variant, seed in (("2:4", 5), ("2:4", 6), ("damage", 7), ("damage", 8), ("medium", 9), ("small", 10)):
        sparse = copy.deepcopy(dense)
        if variant == "2:4":
            _random_masks(sparse, seed)
        elif variant == "damage":
            _damage(sparse, seed)
        else:
            _mild(sparse, seed, size=0.05 if variant == "medium" else 1e-3)
        result = certify(dense, sparse, find_layers(dense, min_weights=0), batches, per_sample=True)
        summary = result["summary"]
        assert summary["not_certifiable"] == [] and "crown_errors" not in summary, summary
        output = summary["output"]
        certified, unchanged = assert_sound(result, dense, sparse, batches, output)
        bound, slack = _check_margins(result, dense, sparse, batches, output)
        if slack is not None:
            assert bool(unchanged[bound > slack].all())
        shares[(variant, seed)] = (float(certified.double().mean()), float(unchanged.double().mean()))
    certified_small, unchanged_small = shares[("small", 10)]
    assert certified_small >= 0.9 * unchanged_small  # a small change is certified almost everywhere


def test_an_op_without_a_relaxation_stops_at_its_box():
    dense, shape = _model("layernorm-softmax")
    batches = _inputs(shape, samples=64)
    sparse = copy.deepcopy(dense)
    _mild(sparse, 3, size=1e-3)
    result = certify(dense, sparse, find_layers(dense, min_weights=0), batches, per_sample=True)
    named = " ".join(result["summary"].get("crown_concretised", []))
    assert "layer_norm" in named or "softmax" in named
    assert_sound(result, dense, sparse, batches, result["summary"]["output"])
    _check_margins(result, dense, sparse, batches, result["summary"]["output"])


class _Chain(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        y = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(y.mean((2, 3)))


def test_in_place_activations_are_relaxed_around_their_input():
    x = torch.randn(4, 4, 8, 8)
    margins = []
    for inplace in (False, True):
        torch.manual_seed(0)
        dense = export_graph(_Chain(inplace).eval(), x, dynamic_batch=True)
        sparse = copy.deepcopy(dense)
        _random_masks(sparse, 0)
        batches = _inputs((4, 8, 8), samples=64)
        result = certify(dense, sparse, find_layers(dense, min_weights=0), batches, per_sample=True)
        assert_sound(result, dense, sparse, batches)
        margins.append(torch.tensor(result["samples"]["crown_margin"]))
    assert torch.allclose(margins[0], margins[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("target", [aten._softmax.default, aten._log_softmax.default], ids=str)
def test_softmax_box_encloses_the_difference(target):
    from sparsecompile.analysis.taylor import TaylorModel

    g = seeded(2)
    act = types.SimpleNamespace(name="x")
    node = types.SimpleNamespace(target=target, args=(act, 1, False), kwargs={})
    for scale in (0.0, 1e-3, 0.3, 3.0, 30.0):
        d = torch.randn(500, 5, dtype=torch.float64, generator=g) * 4
        c = torch.randn(500, 5, dtype=torch.float64, generator=g) * scale
        r = torch.rand(500, 5, dtype=torch.float64, generator=g) * scale
        model = TaylorModel(types.SimpleNamespace(dense_env={}, keep=None))
        model._dense64 = lambda _node: d
        opaque = (torch.zeros_like(d), torch.full_like(d, float("inf")))
        center, radius = model._softmax(node, act, (c, r), opaque)
        assert bool(torch.isfinite(radius).all()) or target == aten._log_softmax.default
        for _ in range(6):
            t = c + (2 * torch.rand(500, 5, dtype=torch.float64, generator=g) - 1) * r
            pick = torch.rand(500, 5, generator=g, dtype=torch.float64)
            t = torch.where(pick < 0.2, c + r, torch.where(pick < 0.4, c - r, t))
            actual = target(d + t, 1, False) - target(d, 1, False)
            assert float(((actual - center).abs() - radius).max()) <= 1e-12
        if scale == 0.0:  # a point box: exact
            assert float(radius.max()) <= 1e-9


def test_per_layer_margin_use_is_reported():
    """Item 4: each changed layer's share of the closest pair's margin, in the table, the summary and the text."""
    from sparsecompile.certificates import certificate_lines, certificate_summary

    dense, shape = _model("residual-inplace")
    batches = _inputs(shape, samples=64)
    sparse = copy.deepcopy(dense)
    _mild(sparse, 3, size=0.05)
    result = certify(dense, sparse, find_layers(dense, min_weights=0), batches, per_sample=True)
    used = result["summary"]["margin_used"]
    ranking = result["margin_ranking"]
    assert ranking and all(row["median"] is not None for row in ranking)
    assert [row["median"] for row in ranking] == sorted((row["median"] for row in ranking), reverse=True)
    assert {row["node"] for row in ranking} == {row["node"] for row in result["layers"]}
    assert all("margin_used" in row for row in result["layers"])
    assert used["median_total"] is not None
    text = "\n".join(certificate_lines(result))
    assert "margin the bound takes" in text and "certified by:" in text
    assert certificate_summary(result)["margin_ranking"] == ranking[:5]


def test_an_in_place_write_read_again_is_refused_not_mismodelled():
    dense, _ = _model("residual-inplace")
    graph = dense.graph
    relu = next(n for n in graph.nodes if n.target == aten.relu_.default)
    source = relu.args[0]
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        reread = graph.call_function(aten.add.Tensor, (source, 1.0))
        total = graph.call_function(aten.sum.default, (reread,))
    out = output.args[0]
    output.args = ((out[0] if isinstance(out, (tuple, list)) else out, total),)
    dense.recompile()
    sparse = copy.deepcopy(dense)
    _mild(sparse, 3, size=1e-3)
    batches = _inputs((4, 8, 8), samples=16)
    result = certify(dense, sparse, None, batches)
    assert any("in-place aliasing" in reason for reason in result["summary"]["not_certifiable"])
