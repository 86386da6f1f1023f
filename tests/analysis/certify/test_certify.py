"""Certificates: the propagated bound against brute force on tiny networks.

The bound must never be below the observed output change, a certified
sample's prediction must never change, nothing masked means a zero bound,
and an op the bound does not model makes the result "not certifiable" with
the op named. Operator norms are checked against the exact norm of the
layer's Jacobian matrix.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import export_graph, randomize_batchnorm, run_pass, seeded
from sparsecompile.analysis.certify import (
    _UNARY, _window_multiplicity, certify, conv_operator_norm_bound, power_iteration_norm,
)
from sparsecompile.graph import add_bias, get_tensor, set_tensor
from sparsecompile.layers import find_layers
from sparsecompile.masks.base import topn_mask
from sparsecompile.passes import FoldBatchNorm

aten = torch.ops.aten


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(torch.relu(self.fc1(x)))))


class ResCNN(nn.Module):
    """conv-BN-ReLU(in place), residual add, max pool, strided conv, avg pool, mean, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + y)
        y = torch.relu(self.conv3(self.pool(y)))
        y = self.avg(y).mean((2, 3))
        return self.fc(torch.flatten(y, 1))


class Zoo(nn.Module):
    """Gating (product of two activations), constants, cat, chunk, layer norm, softmax output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.se = nn.Linear(8, 8)
        self.conv2 = nn.Conv2d(16, 8, 1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        y = F.leaky_relu(self.conv(x), 0.1)
        gate = torch.sigmoid(self.se(F.adaptive_avg_pool2d(y, 1).flatten(1)))
        y = y * gate[:, :, None, None] * 0.5 - y / 4.0
        a, b = torch.chunk(y, 2, dim=1)
        y = torch.cat([y, F.hardswish(a), b], dim=1)
        y = F.interpolate(self.conv2(y), scale_factor=2, mode="nearest").mean((2, 3))
        return torch.softmax(self.fc(self.norm(y)) * 10.0, dim=-1)


def _res_cnn(seed: int = 0) -> ResCNN:
    torch.manual_seed(seed)
    model = ResCNN()
    for bn in (model.bn1, model.bn2):
        randomize_batchnorm(bn, seeded(seed + 1))
        bn.running_var.data.abs_().add_(0.5)
    return model.eval()


def _mask_all(gm, fraction: float | None = None, seed: int = 0):
    """2:4 magnitude masks on every eligible layer (or zero the ``fraction`` smallest entries)."""
    layers = find_layers(gm)
    for layer in layers:
        if layer.reason is not None:
            continue
        w = get_tensor(gm, layer.weight_target)
        if fraction is None:
            keep = topn_mask(w.abs(), layer.reduction_axis, 2, 4)
        else:
            keep = w.abs() > w.abs().flatten().kthvalue(max(1, int(fraction * w.numel()))).values
        set_tensor(gm, layer.weight_target, w * keep)
    return layers


def _shift_biases(gm, scale: float, seed: int = 0):
    """Mimic statistics correction: rescale rows and shift the bias of every layer that has one."""
    g = seeded(seed)
    for name, p in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name.endswith("bias") and p.dim() == 1:
            set_tensor(gm, name, p + scale * torch.randn(p.shape, generator=g))


def _inputs(shape, batches: int = 4, batch: int = 64, seed: int = 3):
    g = seeded(seed)
    scales = [0.5, 1.0, 2.0, 4.0]
    return [torch.randn(batch, *shape, generator=g) * scales[i % 4] for i in range(batches)]


def _assert_sound(result: dict, dense_gm, sparse_gm, batches):
    """Brute force: the bound covers every observed change; certified samples keep their prediction."""
    assert result["summary"]["certifiable"], result["summary"]["not_certifiable"]
    samples = result["samples"]
    with torch.no_grad():
        dense = torch.cat([dense_gm(b)[0] if isinstance(dense_gm(b), tuple) else dense_gm(b) for b in batches])
        sparse = torch.cat([sparse_gm(b)[0] if isinstance(sparse_gm(b), tuple) else sparse_gm(b) for b in batches])
    actual = (sparse.double() - dense.double()).norm(dim=1)
    bound = torch.tensor(samples["bound"], dtype=torch.float64)
    assert torch.allclose(torch.tensor(samples["actual_change"], dtype=torch.float64), actual, rtol=1e-6, atol=1e-7)
    slack = 1e-5 * (1 + dense.double().abs().amax(1))
    assert bool((actual <= bound * (1 + 1e-5) + slack).all()), float((actual - bound).max())
    certified = torch.tensor(samples["certified"])
    unchanged = dense.argmax(1) == sparse.argmax(1)
    assert bool(unchanged[certified].all())
    assert result["summary"]["certified_but_changed"] == 0
    assert result["summary"]["self_check"]["violations"] == 0, result["summary"]["self_check"]
    assert result["summary"]["self_check"]["box_violations"] == 0, result["summary"]["self_check"]
    json.dumps(result)
    return bound, actual, certified, unchanged


# ---------------------------------------------------------------------------------------------- soundness


def _mlp_case(variant: str):
    torch.manual_seed(0)
    model = MLP().eval()
    dense = export_graph(model, torch.randn(4, 16), dynamic_batch=True)
    sparse = copy.deepcopy(dense)
    if variant == "2:4+correction":
        _mask_all(sparse)
        _shift_biases(sparse, 0.05)
    elif variant == "mild":
        _mask_all(sparse, fraction=0.05)
    return dense, sparse, (16,)


def _cnn_case(variant: str):
    model = _res_cnn()
    x = torch.randn(4, 4, 8, 8)
    if variant == "bn-folded":
        dense, _ = run_pass(FoldBatchNorm(), export_graph(model, x, dynamic_batch=True), (x,))
        sparse = copy.deepcopy(dense)
        _mask_all(sparse)
        _shift_biases(sparse, 0.05)
    else:  # BN left in the graph (decomposed: convolution, addmm, tuple-valued batch norm and max pool)
        dense = export_graph(model, x, decompose=True, dynamic_batch=True)
        sparse = copy.deepcopy(dense)
        _mask_all(sparse, fraction=0.02 if variant == "mild" else None)
        if variant == "mild":
            return dense, sparse, (4, 8, 8)
        # statistics correction: re-estimated BN statistics, and a bias where the conv had none
        set_tensor(sparse, "bn1.running_var", get_tensor(sparse, "bn1.running_var") * 1.2)
        set_tensor(sparse, "bn2.running_mean", get_tensor(sparse, "bn2.running_mean") + 0.1)
        conv1 = next(n for n in sparse.graph.nodes if n.op == "call_function"
                     and n.target == aten.convolution.default and n.args[2] is None)
        add_bias(sparse, conv1, (2, "bias"), conv1.args[1].target, 0.05 * torch.ones(8))
        sparse.recompile()
    return dense, sparse, (4, 8, 8)


def _zoo_case(variant: str):
    torch.manual_seed(0)
    model = Zoo().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    dense = export_graph(model, torch.randn(4, 4, 6, 6), dynamic_batch=True)
    sparse = copy.deepcopy(dense)
    _mask_all(sparse, fraction=0.01 if variant == "mild" else None)
    set_tensor(sparse, "norm.bias", get_tensor(sparse, "norm.bias") + (1e-4 if variant == "mild" else 0.01))
    return dense, sparse, (4, 6, 6)


_CASES = {"mlp": _mlp_case, "cnn": _cnn_case, "zoo": _zoo_case}


@pytest.mark.parametrize("case", [
    ("mlp", "2:4+correction"), ("mlp", "mild"), ("cnn", "bn-folded"), ("cnn", "bn-unfolded"), ("cnn", "mild"),
    ("zoo", "2:4"), ("zoo", "mild"),
], ids=lambda c: "-".join(c))
def test_bound_covers_every_observed_change_and_certified_predictions_never_flip(case):
    kind, variant = case
    dense, sparse, shape = _CASES[kind](variant)
    batches = _inputs(shape)
    layers = find_layers(sparse)
    result = certify(dense, sparse, layers, batches, per_sample=True)
    bound, actual, certified, unchanged = _assert_sound(result, dense, sparse, batches)
    summary = result["summary"]
    assert summary["samples"] == 256
    assert summary["observed_unchanged_fraction"] == pytest.approx(float(unchanged.double().mean()))
    assert summary["certified_fraction"] <= summary["observed_unchanged_fraction"]
    assert summary["median_looseness"] >= 1.0 - 1e-6
    assert bool((bound > 0).all())
    if variant == "mild":  # a small perturbation: the certificate must say something (not only "unknown")
        assert summary["certified_fraction"] > 0.1
    # every changed parameter is accounted for: masked layers, shifted biases, BN statistics
    changed_nodes = {row["node"] for row in result["layers"]}
    assert len(changed_nodes) == result["graph"]["changed_nodes"] >= 3
    assert sum(row["share_of_bound"] for row in result["layers"]) == pytest.approx(1.0, rel=1e-9)


def test_build_like_pipeline_with_statistics_correction():
    """Fold BN, mask with magnitude and correct statistics (``--correct bias``) as a build does."""
    from sparsecompile.masks import get_method
    from sparsecompile.sparsify import sparsify

    model = _res_cnn(seed=2)
    x = torch.randn(8, 4, 8, 8)
    gm, fold = run_pass(FoldBatchNorm(), export_graph(model, x, dynamic_batch=True), (x,))
    layers = find_layers(gm)
    dense = copy.deepcopy(gm)
    calib = [(torch.randn(32, 4, 8, 8, generator=seeded(9)),)]
    outcome = sparsify(gm, [layer for layer in layers if layer.reason is None], layers, get_method("magnitude"),
                       calib, correct="bias", folded_batchnorm=fold.outputs)
    assert outcome.corrections  # rows were rescaled and biases shifted
    batches = _inputs((4, 8, 8), batches=2)
    result = certify(dense, gm, layers, batches, per_sample=True)
    _assert_sound(result, dense, gm, batches)
    rows = {row["layer"]: row for row in result["layers"]}
    assert set(rows) >= {layer.name for layer in layers if layer.reason is None}
    corrected = next(r for r in rows.values() if r["gumbel"]["norm_U_j_inf"] > 0)
    assert corrected["gumbel"]["lemma_3_3_holds"]


def test_nothing_masked_gives_a_zero_bound():
    model = _res_cnn()
    x = torch.randn(4, 4, 8, 8)
    dense = export_graph(model, x, dynamic_batch=True)
    batches = _inputs((4, 8, 8), batches=2)
    result = certify(dense, copy.deepcopy(dense), find_layers(dense), batches, per_sample=True, max_samples=100)
    summary = result["summary"]
    assert summary["samples"] == 100 and len(result["samples"]["bound"]) == 100
    assert summary["certifiable"] and summary["median_bound"] == 0.0 and summary["max_bound"] == 0.0
    assert summary["max_actual_change"] == 0.0 and summary["observed_unchanged_fraction"] == 1.0
    assert summary["certified_fraction"] >= 0.99
    assert result["layers"] == []


def test_not_certifiable_still_reports_what_happened():
    """An op that mixes samples cannot be bounded per sample: no bound, the op named, the observed change kept.
    (An op that merely has no bound rule is bounded soundly instead: tests/analysis/certify/test_certify_ops.py.)"""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            y = self.fc1(x)
            return self.fc2(torch.sin(y - y.mean(0, keepdim=True)))

    torch.manual_seed(0)
    dense = export_graph(Odd().eval(), torch.randn(2, 8), dynamic_batch=True)
    sparse = copy.deepcopy(dense)
    _mask_all(sparse)
    result = certify(dense, sparse, None, [torch.randn(16, 8)])
    summary = result["summary"]
    assert summary["certifiable"] is False and summary["certified_fraction"] == 0.0
    assert any("aten.mean" in reason for reason in summary["not_certifiable"])
    assert summary["median_bound"] is None
    assert 0.0 <= summary["observed_unchanged_fraction"] <= 1.0  # what happened is still reported


def test_ops_that_mix_samples_or_differ_between_graphs_are_refused():
    class MixBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x - x.mean(0, keepdim=True))

    torch.manual_seed(0)
    dense = export_graph(MixBatch().eval(), torch.randn(4, 8), dynamic_batch=True)
    sparse = copy.deepcopy(dense)
    _mask_all(sparse)
    reasons = certify(dense, sparse, None, [torch.randn(8, 8)])["summary"]["not_certifiable"]
    assert reasons and "batch" in reasons[0] and "mean" in reasons[0]

    # a sparse graph with an extra node is not "the same model with other weights"
    dense = export_graph(MLP().eval(), torch.randn(4, 16), dynamic_batch=True)
    sparse = copy.deepcopy(dense)
    fc3 = next(n for n in sparse.graph.nodes if n.op == "call_function" and n.target == aten.linear.default
               and n.args[1].target == "fc3.weight")
    with sparse.graph.inserting_after(fc3):
        extra = sparse.graph.call_function(aten.relu.default, (fc3,))
    fc3.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
    sparse.recompile()
    reasons = certify(dense, sparse, None, [torch.randn(8, 16)])["summary"]["not_certifiable"]
    assert reasons and "differ" in reasons[0]


# ------------------------------------------------------------------------------------------- exact gains


class _BiasThenPool(nn.Module):
    def __init__(self, pool: str):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.pool = pool

    def forward(self, x):
        y = self.conv(x)
        return torch.flatten(F.avg_pool2d(y, 2), 1) if self.pool == "avg" else y.mean((2, 3))


@pytest.mark.parametrize("pool", ["mean", "avg"])
def test_averaging_gains_are_exact(pool):
    """Only the conv bias changes: the local term is ||db|| sqrt(HW) and the mean/avg-pool gain must bring it
    down to exactly the observed change (a gain of 1/sqrt(HW) resp. 1/2)."""
    torch.manual_seed(0)
    dense = export_graph(_BiasThenPool(pool).eval(), torch.randn(2, 4, 8, 8), dynamic_batch=True)
    sparse = copy.deepcopy(dense)
    set_tensor(sparse, "conv.bias", get_tensor(sparse, "conv.bias") + torch.linspace(-1, 1, 8))
    result = certify(dense, sparse, None, [torch.randn(16, 4, 8, 8)], per_sample=True)
    bound, actual = torch.tensor(result["samples"]["bound"]), torch.tensor(result["samples"]["actual_change"])
    assert torch.allclose(bound, actual, rtol=1e-5)
    expected = float(torch.linspace(-1, 1, 8).norm()) * (1.0 if pool == "mean" else math.sqrt(16))
    assert float(actual[0]) == pytest.approx(expected, rel=1e-5)


def test_last_layer_only_bound_is_exact_and_ranking_points_at_the_worst_layer():
    torch.manual_seed(1)
    dense = export_graph(MLP().eval(), torch.randn(4, 16), dynamic_batch=True)
    only_last = copy.deepcopy(dense)
    set_tensor(only_last, "fc3.weight", get_tensor(only_last, "fc3.weight") * (torch.rand(10, 32) > 0.3))
    result = certify(dense, only_last, None, [torch.randn(64, 16)], per_sample=True)
    assert result["summary"]["median_looseness"] == pytest.approx(1.0, rel=1e-5)
    assert result["layers"][0]["downstream_gain"] == pytest.approx(1.0)

    two = copy.deepcopy(dense)
    set_tensor(two, "fc1.weight", get_tensor(two, "fc1.weight") * 0.5)  # a big change early
    set_tensor(two, "fc3.weight", get_tensor(two, "fc3.weight") * 0.999)  # a tiny one late
    rows = certify(dense, two, find_layers(two), [torch.randn(64, 16)])["layers"]
    assert [r["layer"] for r in rows] == ["fc1", "fc3"] and rows[0]["risk_rank"] == 1
    assert rows[0]["share_of_bound"] > 0.9
    gumbel = rows[0]["gumbel"]
    assert gumbel["chain_formulas_apply"] is True and gumbel["d"] == 3 and gumbel["j"] == 1
    assert gumbel["norm_mu_B_W_j_inf"] == 0.0  # a rescale, not a mask: all of dW_j is the update U_j
    assert gumbel["norm_U_j_inf"] == pytest.approx(gumbel["norm_dW_j_inf"])
    assert rows[0]["op_norm_estimate"] <= rows[0]["op_norm_bound"] * (1 + 1e-9)


def test_max_pool_gain_counts_overlapping_windows():
    assert _window_multiplicity(8, 8, 3, 1, 1, 1) == 3  # 3x3 stride 1: each input in 3 windows per axis
    assert _window_multiplicity(8, 4, 3, 2, 1, 1) == 2  # 3x3 stride 2 (ResNet stem pool)
    assert _window_multiplicity(8, 4, 2, 2, 0, 1) == 1  # non-overlapping
    assert _window_multiplicity(7, 4, 2, 2, 0, 1) == 1  # ceil mode: the last window is partial


@pytest.mark.parametrize("name,fn", [
    ("gelu", F.gelu), ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")), ("silu", F.silu),
    ("mish", F.mish), ("hardswish", F.hardswish), ("sigmoid", torch.sigmoid), ("selu", F.selu),
    ("hardsigmoid", F.hardsigmoid), ("softplus", F.softplus), ("tanh", torch.tanh),
])
def test_activation_lipschitz_constants_bound_the_derivative(name, fn):
    op = {"gelu_tanh": "gelu"}.get(name, name)
    constant = _UNARY[getattr(aten, op).default]
    x = torch.linspace(-12, 12, 200001, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    assert float(grad.abs().max()) <= constant
    assert float(grad.abs().max()) >= 0.97 * constant  # and is not wildly loose


# ----------------------------------------------------------------------------------------- operator norms


def _exact_norm(fn, shape) -> float:
    x = torch.zeros(shape, dtype=torch.float64)
    jacobian = torch.func.jacrev(fn)(x).reshape(-1, x.numel())
    return float(torch.linalg.matrix_norm(jacobian, ord=2))


@pytest.mark.parametrize("cfg", [
    dict(cin=4, cout=6, k=3, s=1, p=1, d=1, g=1, n=6),
    dict(cin=4, cout=6, k=3, s=2, p=1, d=1, g=1, n=7),
    dict(cin=4, cout=8, k=3, s=1, p=2, d=2, g=2, n=6),
    dict(cin=3, cout=5, k=2, s=2, p=0, d=1, g=1, n=8),
    dict(cin=4, cout=4, k=1, s=2, p=0, d=1, g=1, n=5),
    dict(cin=4, cout=6, k=5, s=3, p=2, d=1, g=1, n=9),
], ids=lambda c: "k{k}s{s}p{p}d{d}g{g}".format(**c))
def test_conv_operator_norm_bound_is_above_the_exact_norm_and_power_iteration_below(cfg):
    w = torch.randn(cfg["cout"], cfg["cin"] // cfg["g"], cfg["k"], cfg["k"], generator=seeded(7), dtype=torch.float64)
    fn = lambda x: F.conv2d(x, w, None, cfg["s"], cfg["p"], cfg["d"], cfg["g"])  # noqa: E731
    shape = (1, cfg["cin"], cfg["n"], cfg["n"])
    exact = _exact_norm(fn, shape)
    bound = conv_operator_norm_bound(w, (cfg["n"], cfg["n"]), cfg["s"], cfg["p"], cfg["d"], cfg["g"])
    estimate = power_iteration_norm(fn, shape, iterations=200)
    assert exact * (1 - 1e-9) <= bound <= 1.35 * exact
    assert 0.99 * exact <= estimate <= exact * (1 + 1e-9)
    # the fallback (too large for the FFT) is looser but still an upper bound
    assert conv_operator_norm_bound(w, (cfg["n"], cfg["n"]), cfg["s"], cfg["p"], cfg["d"], cfg["g"],
                                    max_elements=0) >= bound * (1 - 1e-9)


def test_conv1d_and_transposed_conv_norm_bounds():
    w = torch.randn(6, 4, 3, generator=seeded(1), dtype=torch.float64)
    exact = _exact_norm(lambda x: F.conv1d(x, w, None, 2, 1), (1, 4, 9))
    assert exact <= conv_operator_norm_bound(w, (9,), [2], [1], [1], 1) <= 1.2 * exact
    # a transposed convolution is the adjoint of the convolution on its output grid: same norm
    wt = torch.randn(4, 6, 3, 3, generator=seeded(2), dtype=torch.float64)
    exact_t = _exact_norm(lambda x: F.conv_transpose2d(x, wt, None, 2, 1, 1), (1, 4, 4, 4))
    assert exact_t <= conv_operator_norm_bound(wt, (8, 8), 2, 1, 1, 1) <= 1.2 * exact_t
