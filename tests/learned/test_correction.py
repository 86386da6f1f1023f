"""Statistics correction inside the learning loop (``learned/correction.py``): with the whole set as one
batch it is the build's correction (``sparsify(..., correct=mode)``), it leaves the function alone when off,
it skips what the build skips, and masks learned under it aim at what the correction cannot repair."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from conftest import make_small_net, small_input
from helpers import export_graph
from sparsecompile.errors import SparseCompileError
from sparsecompile.graph import get_tensor
from sparsecompile.layers import find_layers
from sparsecompile.learned import TrainConfig, learn_gumbel_masks, masked_weights
from sparsecompile.learned.correction import InLoopCorrection
from sparsecompile.learned.train import layer_output_probe
from sparsecompile.masks import topn_mask
from sparsecompile.masks.saved import FixedMasks
from sparsecompile.passes import PassContext, PassManager
from sparsecompile.passes.fold_batchnorm import FoldBatchNorm
from sparsecompile.passes.remove_identity import RemoveIdentity
from sparsecompile.sparsify import sparsify
from sparsecompile.verify import flat_outputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _folded_small_net():
    """The small net as a build sees it: identities removed, BatchNorms folded into the convolutions."""
    manager = PassManager([RemoveIdentity(), FoldBatchNorm()])
    gm = manager.run(export_graph(make_small_net(), small_input(4), dynamic_batch=True), PassContext())
    layers = [layer for layer in find_layers(gm, min_weights=0) if layer.reason is None]
    return gm, layers, manager.outputs(FoldBatchNorm.name)


def _magnitude(gm, layers):
    return {layer.weight_target: topn_mask(get_tensor(gm, layer.weight_target).abs(), layer.reduction_axis, 2, 4)
            for layer in layers}


def _run_probe(probe, overrides, *inputs):
    state = {name: t for name, t in list(probe.named_parameters()) + list(probe.named_buffers())}
    state.update(overrides)
    out, features = functional_call(probe, state, inputs)
    return flat_outputs(out)[0], features


@pytest.mark.parametrize("mode, corrected", [("bias", 4), ("bn", 2)])
def test_on_the_whole_set_as_one_batch_it_is_the_builds_correction(mode, corrected):
    gm, layers, folded = _folded_small_net()
    x = small_input(64, seed=5)
    correction = InLoopCorrection(gm, layers, mode, folded)
    assert correction.corrected == corrected  # bn: only the two convolutions had a BatchNorm
    if mode == "bn":
        assert correction.skipped == {"fc1": "no folded BatchNorm", "fc2": "no folded BatchNorm"}
    probe = layer_output_probe(gm, layers, correct=True)
    with torch.no_grad():
        dense_out, dense_features = _run_probe(probe, {}, x, *correction.identity())
        assert torch.equal(dense_out, gm(x))  # no targets: the function is unchanged, bit for bit
        masks = _magnitude(gm, layers)
        uncorrected, _ = _run_probe(probe, masked_weights(gm, masks), x, *correction.identity())
        student, _ = _run_probe(probe, masked_weights(gm, masks), x, *correction.targets(dense_features))

    # The build's path: the dense graph masked and corrected in one sequential calibration traversal.
    sparse = copy.deepcopy(gm)
    result = sparsify(sparse, layers, layers, FixedMasks(masks, 2, 4), [(x,)], correct=mode, folded_batchnorm=folded,
                      sequential=True)
    # The build corrected exactly the layers the loop corrects.
    assert sorted(result.corrections) == sorted(layer.name for layer in layers if layer.name not in correction.skipped)
    with torch.no_grad():
        expected = sparse(x)
    assert torch.allclose(student, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(uncorrected, expected, rtol=1e-2, atol=1e-3)  # the correction did something


class _MatmulNet(nn.Module):
    """``x @ W``: no bias slot, so the build cannot correct it and neither does the loop."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.relu(x @ self.w)


def test_a_layer_without_a_bias_slot_passes_unchanged():
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    gm = export_graph(_MatmulNet().eval(), x[:4], dynamic_batch=True)
    (layer,) = [layer for layer in find_layers(gm, min_weights=0) if layer.reason is None]
    correction = InLoopCorrection(gm, [layer], "bias", None)
    assert correction.corrected == 0 and correction.skipped == {layer.name: "no bias slot to take the shift"}
    probe = layer_output_probe(gm, [layer], correct=True)
    masks = _magnitude(gm, [layer])
    with torch.no_grad():
        _, dense_features = _run_probe(probe, {}, x, *correction.identity())
        student, _ = _run_probe(probe, masked_weights(gm, masks), x, *correction.targets(dense_features))
        plain = torch.relu(x @ masked_weights(gm, masks)[layer.weight_target])
    assert torch.equal(student, plain)


def _offset_toy(seed: int = 0):
    """One Linear(16 -> 4). In each group of 4 inputs, features 0-1 are nearly constant (3 +- 0.01) with
    weights of size 1, features 2-3 are N(0, 1) with weights of size 0.5. Without correction dropping 0-1
    loses a large mean (so the best mask, and magnitude's, keep 0-1); with the per-channel shift and scale
    that mean comes back for free and only 2-3 carry what cannot be repaired, so the best mask keeps 2-3."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(16, 4)
    constant = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(4)
    signs = torch.where(torch.rand(4, 16, generator=generator) < 0.5, -1.0, 1.0)
    with torch.no_grad():  # the constant features' weights share a sign, so their means add up
        linear.weight.copy_(constant + (1 - constant) * 0.5 * signs)
    noise = torch.randn(512, 16, generator=generator)
    inputs = constant * (3 + 0.01 * noise) + (1 - constant) * noise
    gm = export_graph(nn.Sequential(linear).eval(), inputs[:4], dynamic_batch=True)
    keep_offsets = constant.bool().repeat(4, 1)
    return gm, inputs, keep_offsets


def test_masks_learned_under_the_correction_keep_what_it_cannot_repair():
    gm, inputs, keep_offsets = _offset_toy()
    (target,) = [layer.weight_target for layer in find_layers(gm, min_weights=0) if layer.reason is None]
    config = dict(max_steps=300, eval_every=10, patience=None, objective="mse")
    plain = learn_gumbel_masks(gm, inputs, layers=find_layers(gm, min_weights=0),
                               config=TrainConfig(**config))
    assert torch.equal(plain.masks[target], keep_offsets)  # magnitude's mask, and the best one uncorrected
    corrected = learn_gumbel_masks(gm, inputs, layers=find_layers(gm, min_weights=0),
                                   config=TrainConfig(**config, correct="bias"))
    assert torch.equal(corrected.masks[target], ~keep_offsets)
    assert corrected.best_held_out < 0.01 * corrected.history[0]["held_out"]  # from magnitude's start


def test_an_unknown_mode_is_refused():
    with pytest.raises(SparseCompileError, match="unknown correct 'mean'; valid: none, bn, bias"):
        TrainConfig(correct="mean").validate()
