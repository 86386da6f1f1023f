"""Statistics correction as the build runs it -- ``sparsify(..., correct=mode)`` masking the dense graph in one
sequential calibration traversal, here with fixed masks (``FixedMasks``, as the accuracy guard refits): bn mode
equals real BatchNorm re-estimation; bias mode matches dense statistics."""

from __future__ import annotations

import copy

import torch
from torch import nn

from helpers import export_graph
from sparsecompile.graph import get_tensor, set_tensor
from sparsecompile.layers import find_layers
from sparsecompile.masks import get_method
from sparsecompile.masks.saved import FixedMasks
from sparsecompile.passes import FoldBatchNorm, PassContext, PassManager
from sparsecompile.passes.apply_masks import masked
from sparsecompile.sequential import LockstepRunner, snapshot
from sparsecompile.sparsify import sparsify


class ConvBNChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    model = ConvBNChain().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    calib = torch.randn(64, 8, 8, 8) * 1.3 + 0.2
    return model, calib


def _folded(model, calib):
    """The dense graph as the build masks it (BatchNorms folded), its layers and every layer's magnitude mask."""
    gm = export_graph(model, calib[:4], dynamic_batch=True)
    manager = PassManager([FoldBatchNorm()])
    gm = manager.run(gm, PassContext(example_inputs=(calib[:4],)))
    layers = find_layers(gm)
    masks = {layer.weight_target: get_method("magnitude").select(get_tensor(gm, layer.weight_target), layer)
             for layer in layers}
    return gm, manager.outputs(FoldBatchNorm.name), layers, masks


def _sparsify(gm, folded, layers, masks, chunks, correct):
    """The build's path: mask the dense ``gm`` in place with ``masks`` in one sequential calibration traversal,
    correcting statistics (``correct``) layer by layer as it goes."""
    return sparsify(gm, layers, layers, FixedMasks(masks, 2, 4), chunks, correct=correct,
                    folded_batchnorm=folded, sequential=True)


def test_bn_mode_equals_eager_batchnorm_recalibration():
    model, calib = _model_and_data()
    gm, folded, layers, masks = _folded(model, calib)
    result = _sparsify(gm, folded, layers, masks, [(calib[:32],), (calib[32:],)], "bn")
    assert sorted(result.corrections) == ["conv1", "conv2"]

    # The same masks on the eager model, then BN statistics re-measured the standard way.
    eager = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("conv1", "conv2", "fc"):
            conv = getattr(eager, name)
            conv.weight.mul_(masks[f"{name}.weight"])
        for bn in (eager.bn1, eager.bn2):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        eager.train()
        eager(calib)  # one batch: BN normalizes with, and stores, the calibration statistics
        eager.eval()
        for bn in (eager.bn1, eager.bn2):  # torch stores the unbiased variance; BN normalizes with the biased one
            n = calib.shape[0] * calib.shape[2] * calib.shape[3]
            bn.running_var.mul_((n - 1) / n)
        torch.testing.assert_close(gm(calib), eager(calib), rtol=2e-4, atol=2e-4)


def test_bias_mode_matches_dense_channel_statistics():
    model, calib = _model_and_data(1)
    gm, folded, layers, masks = _folded(model, calib)
    dense_state = snapshot(gm)
    dense = export_graph(model, calib[:4], dynamic_batch=True)
    records = _sparsify(gm, folded, layers, masks, [(calib,)], "bias").corrections
    assert set(records) == {"conv1", "conv2", "fc"}
    # Matching mean and variance is not a least-squares fit: one layer's error may grow; the model's must not.
    assert all(r["error_before"] > 0 and r["error_after"] > 0 for r in records.values())
    # conv1's outputs now have the dense per-channel mean and variance.
    with torch.no_grad():
        sparse_out = torch.nn.functional.conv2d(calib, get_tensor(gm, "conv1.weight"), get_tensor(gm, "conv1.bias"),
                                                padding=1)
        dense_out = torch.nn.functional.conv2d(calib, dense_state["conv1.weight"], dense_state["conv1.bias"], padding=1)
    torch.testing.assert_close(sparse_out.mean((0, 2, 3)), dense_out.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse_out.var((0, 2, 3)), dense_out.var((0, 2, 3)), rtol=1e-3, atol=1e-4)
    # Correction rescales whole rows: the 2:4 pattern is untouched.
    assert torch.equal(get_tensor(gm, "conv1.weight") != 0, masks["conv1.weight"])
    # And it helps the model as a whole.
    error = lambda out: float((out - dense(calib)).norm() / dense(calib).norm())  # noqa: E731
    uncorrected, folded, layers, masks = _folded(model, calib)
    _sparsify(uncorrected, folded, layers, masks, [(calib,)], "none")
    assert error(gm(calib)) < error(uncorrected(calib))


def test_bn_mode_without_batchnorm_does_nothing():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    x = torch.randn(16, 8)
    gm = export_graph(model, x)
    layers = find_layers(gm)
    masks = {layer.weight_target: get_method("magnitude").select(get_tensor(gm, layer.weight_target), layer)
             for layer in layers}
    before = snapshot(gm)
    result = sparsify(gm, layers, layers, FixedMasks(masks, 2, 4), [(x,)], correct="bn", folded_batchnorm={},
                      sequential=True)
    assert result.corrections == {} and result.batchnorm_reestimated == {}
    # Nothing but the masks: no bias added, no weight or bias rescaled.
    after = snapshot(gm)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], masked(value, masks[name]) if name in masks else value), name


def test_lockstep_runner_without_hooks_reproduces_the_model():
    model, calib = _model_and_data(2)
    gm = export_graph(model, calib[:4], dynamic_batch=True)
    chunks = [(calib[:20],), (calib[20:],)]
    reference, working = LockstepRunner(gm, snapshot(gm)).run(chunks, set())
    for (x,), ref, work in zip(chunks, reference, working):
        expected = model(x)
        torch.testing.assert_close(ref[0], expected)
        torch.testing.assert_close(work[0], expected)


def test_reference_stream_keeps_dense_weights():
    model, calib = _model_and_data(3)
    gm = export_graph(model, calib[:4], dynamic_batch=True)
    state = snapshot(gm)
    set_tensor(gm, "fc.weight", torch.zeros_like(gm.fc.weight))
    reference, working = LockstepRunner(gm, state).run([(calib,)], set())
    torch.testing.assert_close(reference[0][0], model(calib))
    torch.testing.assert_close(working[0][0], gm.fc.bias.expand(64, 8))


class BNAfterReLU(nn.Module):
    """conv -> ReLU -> BN: the fold cannot remove this BN, so bn mode re-estimates it in place."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.bn(torch.relu(self.conv1(x))))


def test_bn_mode_reestimates_batchnorm_the_fold_left_in_place():
    torch.manual_seed(4)
    model = BNAfterReLU().eval()
    model.bn.running_mean.uniform_(0.0, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    calib = torch.randn(32, 8, 6, 6)
    gm, folded, layers, masks = _folded(model, calib)
    assert folded == {}  # nothing foldable
    result = _sparsify(gm, folded, layers, masks, [(calib[:16],), (calib[16:],)], "bn")
    assert result.corrections == {} and len(result.batchnorm_reestimated) == 1

    eager = copy.deepcopy(model)
    with torch.no_grad():
        eager.conv1.weight.mul_(masks["conv1.weight"])
        eager.conv2.weight.mul_(masks["conv2.weight"])
        eager.bn.reset_running_stats()
        eager.bn.momentum = None
        eager.train()
        eager(calib)
        eager.eval()
        n = 32 * 6 * 6
        eager.bn.running_var.mul_((n - 1) / n)
        torch.testing.assert_close(gm(calib), eager(calib), rtol=2e-4, atol=2e-4)


def _moments_float64(values, axis):
    """The float64 reference: every value converted to float64 and summed there."""
    v = torch.cat([x.double().movedim(axis, -1).reshape(-1, x.shape[axis]) for x in values])
    return v.mean(0), v.var(0, unbiased=False)


def test_channel_moments_in_float32_match_float64_even_with_a_large_mean():
    from sparsecompile.passes.correct_statistics import _channel_moments

    generator = torch.Generator().manual_seed(5)
    # A channel whose mean is 1000x its spread: E[x^2] - E[x]^2 in float32 would lose every digit here.
    offsets = torch.tensor([0.0, 3.0, -2000.0, 50.0]).reshape(1, 4, 1, 1)
    values = [torch.randn(n, 4, 30, 30, generator=generator) + offsets for n in (7, 3, 5)]
    mean, var = _channel_moments(values, 1)
    ref_mean, ref_var = _moments_float64(values, 1)
    assert mean.dtype == var.dtype == torch.float64
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=0)
    linear = [torch.randn(6, 11, 9, generator=generator) for _ in range(2)]
    for got, want in zip(_channel_moments(linear, -1), _moments_float64(linear, -1)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # Same inputs, same bytes.
    again = _channel_moments(values, 1)
    assert torch.equal(again[0], mean) and torch.equal(again[1], var)


def test_relative_error_in_float32_matches_float64():
    from sparsecompile.passes.correct_statistics import _relative_error

    generator = torch.Generator().manual_seed(6)
    reference = [torch.randn(4, 16, 20, 20, generator=generator) for _ in range(3)]
    candidate = [r + 0.01 * torch.randn(r.shape, generator=generator) for r in reference]
    num = sum(float(((c.double() - r.double()) ** 2).sum()) for r, c in zip(reference, candidate))
    den = sum(float((r.double() ** 2).sum()) for r in reference)
    assert abs(_relative_error(reference, candidate) - (num / den) ** 0.5) < 1e-5 * (num / den) ** 0.5
    assert _relative_error([torch.zeros(3)], [torch.ones(3)]) == 0.0
