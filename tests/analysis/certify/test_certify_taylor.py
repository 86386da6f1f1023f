"""The elementwise Taylor boxes of certify (analysis/taylor.py): each local rule encloses the true difference.

For every elementwise rule, random dense values ``d`` and random input boxes ``c +- r`` (small to large),
every difference ``t`` inside the box must map into the output box: ``sigma(d + t) - sigma(d)`` within
``c' +- r'``. The product and max-pool rules are checked the same way, and on whole models the per-node
self-check (observed difference inside the box at every node) must count no violation.
"""

from __future__ import annotations

import types

import pytest
import torch

from helpers import seeded
from sparsecompile.analysis.taylor import TaylorModel, intersect, output_certificate

aten = torch.ops.aten

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_ELEMENTWISE = [aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.leaky_relu.default,
                aten.hardsigmoid.default, aten.abs.default, aten.hardswish.default, aten.sigmoid.default,
                aten.tanh.default, aten.silu.default, aten.gelu.default, aten.elu.default, aten.mish.default,
                aten.softplus.default]


def _model(d):
    runner = types.SimpleNamespace(dense_env={}, keep=None)
    model = TaylorModel(runner)
    model._dense64 = lambda node: d
    return model


@pytest.mark.parametrize("target", _ELEMENTWISE, ids=str)
def test_elementwise_rule_encloses_the_difference(target):
    g = seeded(0)
    node = types.SimpleNamespace(target=target, args=(types.SimpleNamespace(name="x"),), kwargs={})
    for scale in (1e-3, 0.1, 1.0, 4.0):
        d = torch.randn(4000, dtype=torch.float64, generator=g) * 3
        c = torch.randn(4000, dtype=torch.float64, generator=g) * scale
        r = torch.rand(4000, dtype=torch.float64, generator=g) * scale
        center, radius = _model(d)._unary(node, node.args[0], (c, r))
        for _ in range(4):
            t = c + (2 * torch.rand(4000, dtype=torch.float64, generator=g) - 1) * r
            t = torch.where(torch.rand(4000, generator=g, dtype=torch.float64) < 0.2, c + r, t)  # box corners
            actual = target(d + t) - target(d)
            assert float(((actual - center).abs() - radius).max()) <= 1e-12
        if scale == 1e-3 and target in (aten.relu.default, aten.hardsigmoid.default):
            # away from the kinks a piecewise-linear op is exact: the radius is only what came in
            far = (d.abs() > 0.1) & ((d.abs() - 3).abs() > 0.1)
            assert float((radius[far] - r[far]).max()) <= 1e-9


def test_bounded_outputs_cap_the_box():
    d = torch.zeros(3, dtype=torch.float64)
    node = types.SimpleNamespace(target=aten.hardsigmoid.default, args=(types.SimpleNamespace(name="x"),), kwargs={})
    center, radius = _model(d)._unary(node, node.args[0], (torch.zeros(3, dtype=torch.float64),
                                                           torch.full((3,), 1e6, dtype=torch.float64)))
    # hardsigmoid(0) = 0.5 and the output lies in [0, 1]: the difference in [-0.5, 0.5]
    assert float((center.abs() + radius).max()) <= 0.5 + 1e-9


def test_product_rule_encloses_the_difference():
    g = seeded(1)
    x_d, y_d = torch.randn(64, 8, 5, 5, dtype=torch.float64, generator=g), torch.rand(64, 8, 1, 1, dtype=torch.float64, generator=g)
    cx, rx = torch.randn(64, 8, 5, 5, dtype=torch.float64, generator=g), torch.rand(64, 8, 5, 5, dtype=torch.float64, generator=g)
    cy, ry = torch.randn(64, 8, 1, 1, dtype=torch.float64, generator=g) * 0.1, torch.rand(64, 8, 1, 1, dtype=torch.float64, generator=g) * 0.1
    x, y = types.SimpleNamespace(name="x"), types.SimpleNamespace(name="y")
    model = _model(None)
    model._dense64 = lambda node: x_d if node is x else y_d
    model.boxes = {"x": (cx, rx), "y": (cy, ry)}
    model.box = lambda node: model.boxes.get(node.name)
    node = types.SimpleNamespace(target=aten.mul.Tensor, args=(x, y), kwargs={})
    center, radius = model._product(node, [x, y], None, x_d * y_d)
    for _ in range(8):
        dx = cx + (2 * torch.rand(cx.shape, dtype=torch.float64, generator=g) - 1) * rx
        dy = cy + (2 * torch.rand(cy.shape, dtype=torch.float64, generator=g) - 1) * ry
        actual = (x_d + dx) * (y_d + dy) - x_d * y_d
        assert float(((actual - center).abs() - radius).max()) <= 1e-12


def test_intersect_and_output_certificate():
    c, r = intersect(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), -0.5, 1.5)
    assert torch.allclose(c - r, torch.tensor([-0.5, 1.0]), atol=1e-9)
    assert torch.allclose(c + r, torch.tensor([1.0, 1.5]), atol=1e-9)
    z = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.1, 0.0]])
    box = (torch.zeros(2, 3, dtype=torch.float64), torch.full((2, 3), 0.4, dtype=torch.float64))
    certified, bound = output_certificate(box, z, torch.zeros(2, dtype=torch.float64))
    assert certified.tolist() == [True, False]  # margin 2 > 0.8; margin 0.1 < 0.8
    assert torch.allclose(bound, torch.full((2,), 0.4 * 3 ** 0.5, dtype=torch.float64))
