"""Channel groups: random permutations of every group found leave the network's outputs unchanged.

Each model is exported (both the ``torch.export`` form and the decomposed
form), its groups are found, every permutable group gets a *random*
segment-preserving permutation (a much harsher test than the search's
output, which is often close to identity), and the result is compared with
the eager module. Negative cases check that unsafe patterns leave the
group unpermuted, with a reason.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_same_function, export_graph, randomize_batchnorm, run_pass, seeded
from sparsecompile.graph import get_tensor
from sparsecompile.layers import find_layers
from sparsecompile.passes import FoldBatchNorm
from sparsecompile.permutation.groups import apply_permutation, find_groups, random_permutation, reshape_axis

FORMS = pytest.mark.parametrize("decompose", [False, True], ids=["aten", "decomposed"])


def _bn(channels, generator, dims=2):
    bn = nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    randomize_batchnorm(bn, generator)
    return bn


class ConvChain(nn.Module):
    def __init__(self):
        super().__init__()
        g = seeded(1)
        self.c1 = nn.Conv2d(4, 16, 3, padding=1)
        self.bn1 = _bn(16, g)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.c3(x)


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride, g):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, mid, 1, bias=False), _bn(mid, g)
        self.c2, self.b2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False), _bn(mid, g)
        self.c3, self.b3 = nn.Conv2d(mid, cout, 1, bias=False), _bn(cout, g)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _bn(cout, g))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)))
        y = self.b3(self.c3(y))
        return torch.relu(y + (self.down(x) if self.down is not None else x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = seeded(2)
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), _bn(16, g)
        self.blocks = nn.Sequential(Bottleneck(16, 8, 32, 1, g), Bottleneck(32, 8, 32, 1, g),
                                    Bottleneck(32, 16, 64, 2, g), Bottleneck(64, 16, 64, 1, g))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DenseBlock(nn.Module):
    """DenseNet-like: every conv reads the concatenation of everything before it; plus an Inception-like cat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.d1 = nn.Conv2d(16, 8, 3, padding=1)
        self.d2 = nn.Conv2d(24, 8, 3, padding=1)
        self.branch_a = nn.Conv2d(32, 12, 1)
        self.branch_b = nn.Conv2d(32, 4, 3, padding=1)
        self.head = nn.Conv2d(48, 8, 1)

    def forward(self, x):
        x0 = torch.relu(self.stem(x))
        x1 = torch.cat([x0, torch.relu(self.d1(x0))], 1)
        x2 = torch.cat([x1, torch.relu(self.d2(x1))], 1)
        inception = torch.cat([self.branch_a(x2), self.branch_b(x2)], 1)
        return self.head(torch.cat([inception, x2], 1))


class MobileBlock(nn.Module):
    def __init__(self):
        super().__init__()
        g = seeded(3)
        self.expand, self.b1 = nn.Conv2d(8, 32, 1, bias=False), _bn(32, g)
        self.dw, self.b2 = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), _bn(32, g)
        self.project, self.b3 = nn.Conv2d(32, 8, 1, bias=False), _bn(8, g)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = nn.functional.relu6(self.b1(self.expand(x)))
        y = nn.functional.hardswish(self.b2(self.dw(y)))
        y = self.b3(self.project(y)) + x
        return self.out(torch.relu(self.grouped(y)))


class ConvFlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16 * 3 * 3, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class TransformerBlock(nn.Module):
    def __init__(self, width=16, hidden=64):
        super().__init__()
        self.embed = nn.Linear(12, width)
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.head = nn.Linear(width, 6)
        with torch.no_grad():
            for ln in (self.ln1, self.ln2):
                ln.weight.normal_()
                ln.bias.normal_()

    def forward(self, x):
        h = self.embed(x)
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        h = h + self.proj(attn)
        h = h + self.fc2(nn.functional.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 16, 1)
        self.side = nn.Linear(8, 8)
        self.tail = nn.Linear(8, 4)

    def forward(self, x, z):
        s = torch.relu(self.a(x)) * torch.sigmoid(self.b(z))
        y = self.mix(s)
        t = self.tail(torch.relu(self.side(s.mean((2, 3)))))
        return y, t


def permute_all(gm, seed=0):
    """Find groups over every eligible layer and give each permutable group a random permutation."""
    layers = find_layers(gm, min_weights=0)
    eligible = {layer.node_name for layer in layers if layer.reason is None}
    groups = find_groups(gm, layers, eligible)
    generator = seeded(seed)
    changed = 0
    for group in groups:
        if group.reason is None:
            perm = random_permutation(group, generator)
            changed += int(not torch.equal(perm, torch.arange(group.size)))
            apply_permutation(gm, group, perm)
    gm.recompile()
    return groups, changed


def _groups_by_consumers(groups):
    return {tuple(sorted(c.layer.name for c in g.consumers)): g for g in groups}


CASES = {
    "conv_chain": (ConvChain, lambda: (torch.randn(2, 4, 8, 8),)),
    "resnet": (TinyResNet, lambda: (torch.randn(2, 3, 8, 8),)),
    "dense_cat": (DenseBlock, lambda: (torch.randn(2, 3, 6, 6),)),
    "mobile": (MobileBlock, lambda: (torch.randn(2, 8, 6, 6),)),
    "flatten_linear": (ConvFlattenLinear, lambda: (torch.randn(2, 3, 6, 6),)),
    "transformer": (TransformerBlock, lambda: (torch.randn(2, 5, 12),)),
    "two_in_two_out": (TwoInTwoOut, lambda: (torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5))),
}


@FORMS
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fold", [False, True], ids=["bn", "folded"])
def test_random_permutations_keep_the_function(case, decompose, fold):
    torch.manual_seed(0)
    cls, make_inputs = CASES[case]
    model = cls().eval()
    inputs = make_inputs()
    gm = export_graph(model, *inputs, decompose=decompose)
    if fold:
        gm, _ = run_pass(FoldBatchNorm(), gm, inputs)
    groups, changed = permute_all(gm, seed=1)
    assert changed >= 1, f"no group was permuted: {[(g.id, g.reason) for g in groups]}"
    assert_same_function(model, gm, inputs, rtol=1e-4, atol=1e-5)


def test_a_wrong_permutation_is_detected():
    """The equivalence check can fail: permuting only a consumer (not its producer) changes outputs."""
    model = ConvChain().eval()
    x = torch.randn(2, 4, 8, 8)
    gm = export_graph(model, x)
    layers = find_layers(gm, min_weights=0)
    groups = find_groups(gm, layers, {layer.node_name for layer in layers if layer.reason is None})
    group = next(g for g in groups if g.reason is None and g.producers)
    group.edits = [e for e in group.edits if e.role == "consumer"]
    apply_permutation(gm, group, random_permutation(group, seeded(0)))
    gm.recompile()
    with pytest.raises(AssertionError):
        assert_same_function(model, gm, (x,), rtol=1e-4, atol=1e-5)


def test_resnet_groups_follow_the_residual_stream():
    model = TinyResNet().eval()
    gm = export_graph(model, torch.randn(2, 3, 8, 8))
    layers = find_layers(gm, min_weights=0)
    groups = find_groups(gm, layers, {layer.node_name for layer in layers if layer.reason is None})
    by_consumers = _groups_by_consumers(groups)
    # the 32-channel stream between blocks 0 and 2: read by blocks 1 and 2 (conv1 and the projection)
    stream = by_consumers[("blocks.1.c1", "blocks.2.c1", "blocks.2.down.0")]
    assert stream.reason is None
    assert set(stream.producers) == {"blocks.0.c3", "blocks.0.down.0", "blocks.1.c3"}
    assert stream.size == 32
    # the last stream feeds the classifier through global pooling and flatten (a block of 1 feature)
    last = by_consumers[("blocks.3.c1", "fc")]
    assert last.reason is None and all(c.scored for c in last.consumers)
    # inside a block: conv1 -> bn -> relu -> conv2
    inner = by_consumers[("blocks.0.c2",)]
    assert inner.producers == ["blocks.0.c1"] and inner.size == 8
    # unfolded BatchNorm statistics are permuted along
    assert any(e.target.endswith("running_mean") for e in inner.edits)


def test_cat_splits_the_space_into_segments():
    model = DenseBlock().eval()
    gm = export_graph(model, torch.randn(2, 3, 6, 6))
    layers = find_layers(gm, min_weights=0)
    groups = find_groups(gm, layers, {layer.node_name for layer in layers if layer.reason is None})
    dense = next(g for g in groups if "d1" in [c.layer.name for c in g.consumers])
    assert dense.reason is None
    assert {c.layer.name for c in dense.consumers} == {"d1", "d2", "branch_a", "branch_b", "head"}
    # x0 (16) | d1 (8) | d2 (8) at the end of the head's input, after the inception outputs (12 | 4)
    starts = {start for start, _ in dense.segments()}
    assert {0, 12, 16, 32, 40} <= starts, dense.segments()
    assert dense.size == 48


def test_flatten_into_linear_is_a_block_read():
    model = ConvFlattenLinear().eval()
    gm = export_graph(model, torch.randn(2, 3, 6, 6))
    layers = find_layers(gm, min_weights=0)
    groups = find_groups(gm, layers, {layer.node_name for layer in layers if layer.reason is None})
    flat = next(g for g in groups if "fc1" in [c.layer.name for c in g.consumers])
    assert flat.reason is None and flat.producers == ["c2"]
    (reader,) = flat.consumers
    assert reader.block == 9 and not reader.scored


def test_depthwise_passes_the_permutation_through():
    model = MobileBlock().eval()
    gm = export_graph(model, torch.randn(2, 8, 6, 6))
    layers = find_layers(gm, min_weights=0)
    groups = find_groups(gm, layers, {layer.node_name for layer in layers if layer.reason is None})
    group = next(g for g in groups if "project" in [c.layer.name for c in g.consumers])
    assert group.reason is None and group.producers == ["expand"]
    assert any(e.target == "dw.weight" and e.role == "passthrough" for e in group.edits)
    # the residual stream x -> ... + x comes from the model input: cannot be permuted
    stream = next(g for g in groups if "expand" in [c.layer.name for c in g.consumers])
    assert stream.reason and "model input" in stream.reason


def test_grouped_conv_constrains_the_permutation_to_its_groups():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.g = nn.Conv2d(16, 16, 3, padding=1, groups=2)
            self.b = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.b(torch.relu(self.g(torch.relu(self.a(x)))))

    model = Grouped().eval()
    x = torch.randn(2, 3, 5, 5)
    gm = export_graph(model, x)
    layers = find_layers(gm, min_weights=0)
    groups = find_groups(gm, layers, {layer.node_name for layer in layers if layer.reason is None})
    for group in groups:
        assert group.reason is None
        assert (0, 8) in group.segments() and (8, 16) in group.segments()
    permute_all(gm, seed=3)
    assert_same_function(model, gm, (x,), rtol=1e-4, atol=1e-5)


class OutputChannels(nn.Module):
    """The first conv's output is also a model output: its channel order is part of the interface."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y), y


class SliceChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))[:, :8])


class ShuffleChannels(nn.Module):
    """ShuffleNet's channel shuffle: a reshape that mixes channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(y)


class CumsumChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), 1))


class CatTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cat([y, y], 1))


class ChannelSum(nn.Module):
    """A reduction over the channels is permutation-invariant: the group stays permutable."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y) * y.sum(1, keepdim=True)


@pytest.mark.parametrize("cls, fragment", [
    (OutputChannels, "model output"),
    (SliceChannels, "slices along the channel axis"),
    (ShuffleChannels, "reshape"),
    (CumsumChannels, "cumsum"),
    (CatTwice, "two different channel positions"),
], ids=["output", "slice", "shuffle", "unknown-op", "cat-twice"])
@FORMS
def test_unsafe_patterns_leave_the_group_unpermuted(cls, fragment, decompose):
    model = cls().eval()
    x = torch.randn(2, 3, 5, 5)
    gm = export_graph(model, x, decompose=decompose)
    before = {name: get_tensor(gm, name).clone() for name, _ in model.named_parameters()}
    groups, _ = permute_all(gm)
    blocked = [g for g in groups if g.reason]
    assert blocked, [(g.id, g.reason) for g in groups]
    assert any(fragment in g.reason for g in blocked), [g.reason for g in blocked]
    for group in blocked:  # nothing of a blocked group was touched
        for consumer in group.consumers:
            target = consumer.layer.weight_target
            assert torch.equal(get_tensor(gm, target), before[target])
    assert_same_function(model, gm, (x,), rtol=1e-4, atol=1e-5)


def test_channel_reduction_is_invariant():
    model = ChannelSum().eval()
    x = torch.randn(2, 3, 5, 5)
    gm = export_graph(model, x)
    groups, changed = permute_all(gm, seed=4)
    assert all(g.reason is None for g in groups) and changed
    assert_same_function(model, gm, (x,), rtol=1e-4, atol=1e-5)


def test_reshape_axis():
    assert reshape_axis((2, 16, 3, 3), (2, 144), 1) == (1, 9)
    assert reshape_axis((2, 16, 1, 1), (2, 16), 1) == (1, 1)
    assert reshape_axis((-1, 16, 4), (-1, 16, 2, 2), 1) == (1, 1)
    assert reshape_axis((2, 16, 3, 3), (32, 8, 9), 1) is None  # mixes channels with the batch
    assert reshape_axis((2, 16, 3, 3), (2, 8, 18), 1) is None  # splits the channels


def test_gated_branches_and_pooled_reads_form_one_group():
    model = TwoInTwoOut().eval()
    gm = export_graph(model, torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5))
    layers = find_layers(gm, min_weights=0)
    groups = find_groups(gm, layers, {layer.node_name for layer in layers if layer.reason is None})
    gated = next(g for g in groups if "mix" in [c.layer.name for c in g.consumers])
    assert gated.reason is None
    assert {c.layer.name for c in gated.consumers} == {"mix", "side"}  # side reads s.mean((2, 3))
    assert set(gated.producers) == {"a", "b"}  # both factors of the product carry the channels
