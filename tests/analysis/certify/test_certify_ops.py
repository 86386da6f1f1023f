"""Certificates on every op family a build accepts: one tiny model per family.

Each model is certified against copies with changed parameters (random 2:4
masks on every GEMM weight, and a mild perturbation that leaves room to
certify), and the soundness invariant is checked by brute force on every
sample: the bound covers the observed output change, and a sample the
certificate calls certified keeps its prediction in the sparse model. An op
without a bound rule is named in the report and bounded soundly (as
"anything" where its input may change), never a crash.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import export_graph, randomize_batchnorm, run_pass, seeded
from sparsecompile.analysis.certify import certify, static_batch_size
from sparsecompile.graph import get_tensor, set_tensor
from sparsecompile.layers import find_layers
from sparsecompile.masks.base import topn_mask
from sparsecompile.passes import FoldBatchNorm
from sparsecompile.verify import flat_outputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLES = 192


# ------------------------------------------------------------------------------------------------- models


class BatchNormNet(nn.Module):
    """conv-BN-ReLU twice (BN kept in the graph or folded), a BN1d after a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.bn3 = nn.Linear(8, 16), nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.fc2(torch.relu(self.bn3(self.fc1(y.mean((2, 3))))))


class GroupedNet(nn.Module):
    """A MobileNet block: pointwise, depthwise (stride 2), grouped 3x3, then a classifier."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(4, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 8, 3, padding=1, groups=4)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        y = F.relu6(self.expand(x))
        y = F.relu6(self.depthwise(y))
        return self.fc(self.grouped(y).mean((2, 3)))


class ActivationNet(nn.Module):
    """hard-swish, SiLU, GELU (both forms), hard-sigmoid gating (a squeeze-excite), mish, clip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 6)

    def forward(self, x):
        y = F.hardswish(self.conv(x))
        gate = F.hardsigmoid(self.se2(F.silu(self.se1(y.mean((2, 3), keepdim=True)))))
        y = (y * gate).mean((2, 3))
        y = F.gelu(self.fc1(y))
        y = F.mish(F.gelu(self.fc2(y), approximate="tanh"))
        return self.fc3(torch.clip(y, -3.0, 3.0))


class PoolNet(nn.Module):
    """max pooling (overlapping), average pooling, adaptive average and adaptive max pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 + 8 * 4, 6)

    def forward(self, x):
        y = F.max_pool2d(torch.relu(self.conv1(x)), 3, stride=2, padding=1)  # 8x8 -> 4x4
        y = F.avg_pool2d(torch.relu(self.conv2(y)), 2, stride=1, padding=1)  # 4x4 -> 5x5
        a = F.adaptive_avg_pool2d(y, 2).flatten(1)
        b = F.adaptive_max_pool2d(y, 2).flatten(1)
        return self.fc(torch.cat([a, b], 1))


class ConcatNet(nn.Module):
    """Two branches concatenated on channels (an Inception/DenseNet cell), a residual into the concat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 1)
        self.right = nn.Conv2d(8, 4, 3, padding=1)
        self.mix = nn.Conv2d(20, 8, 1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.cat([torch.relu(self.left(y)), y, torch.relu(self.right(y))], dim=1)
        return self.fc(torch.relu(self.mix(y)).mean((2, 3)))


class ReshapeNet(nn.Module):
    """view / reshape with the batch written out, flatten, transpose, permute, a token mixer on [N, T, C]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)  # 8x8 -> 4x4: 16 tokens of 8 channels
        self.token = nn.Linear(16, 16)
        self.channel = nn.Linear(8, 8)
        self.fc = nn.Linear(8 * 16, 6)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        n = x.shape[0]
        tokens = y.view(n, 8, 16).transpose(1, 2)  # [N, 16 tokens, 8 channels]
        tokens = tokens + torch.relu(self.token(tokens.permute(0, 2, 1))).permute(0, 2, 1)
        tokens = torch.relu(self.channel(tokens))
        return self.fc(tokens.reshape(n, -1) + torch.flatten(tokens.transpose(1, 2).contiguous(), 1) * 0.5)


class TwoOutputs(nn.Module):
    """A detector-like head: class logits and a box regression, from one trunk."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.cls = nn.Linear(8, 6)
        self.box = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return self.box(y), self.cls(y)


def _inputs(shape, seed: int = 3, samples: int = SAMPLES, batch: int = 64):
    g = seeded(seed)
    scales = [0.5, 1.0, 2.0, 4.0]
    x = torch.cat([torch.randn(batch, *shape, generator=g) * scales[i % 4] for i in range(-(-samples // batch))])[:samples]
    return [x[i:i + batch] for i in range(0, samples, batch)]


def _batchnorm_net():
    torch.manual_seed(0)
    model = BatchNormNet()
    for i, bn in enumerate((model.bn1, model.bn2, model.bn3)):
        randomize_batchnorm(bn, seeded(10 + i))
        bn.running_var.data.abs_().add_(0.5)
    return model.eval()


def _export(name: str):
    """(dense graph, input shape without the batch) for each op family."""
    x = torch.randn(4, 4, 8, 8)
    if name == "batchnorm-unfolded":
        return export_graph(_batchnorm_net(), x, dynamic_batch=True), (4, 8, 8)
    if name == "batchnorm-decomposed":
        return export_graph(_batchnorm_net(), x, decompose=True, dynamic_batch=True), (4, 8, 8)
    if name == "batchnorm-folded":
        gm, _ = run_pass(FoldBatchNorm(), export_graph(_batchnorm_net(), x, dynamic_batch=True), (x,))
        return gm, (4, 8, 8)
    torch.manual_seed(0)
    model = {"depthwise-grouped": GroupedNet, "activations": ActivationNet, "pooling": PoolNet,
             "concat": ConcatNet, "reshape": ReshapeNet, "two-outputs": TwoOutputs}[name]().eval()
    return export_graph(model, x, dynamic_batch=True), (4, 8, 8)


# ------------------------------------------------------------------------------------------ perturbations


def _weights(gm):
    """Every conv/linear weight (depthwise and grouped included, eligible for 2:4 or not)."""
    return [(name, p) for name, p in gm.named_parameters() if p.dim() >= 2]


def _random_masks(gm, seed: int) -> None:
    """A random 2:4 mask along the input channels of every weight that has a multiple of 4 of them."""
    g = seeded(seed)
    for name, w in _weights(gm):
        if w.shape[1] % 4:
            continue
        keep = topn_mask(torch.rand(w.shape, generator=g), 1, 2, 4)
        set_tensor(gm, name, w.detach() * keep)


def _mild(gm, seed: int, size: float = 1e-3) -> None:
    """Nudge every weight, bias and BatchNorm statistic by ~``size`` relative (room to certify)."""
    g = seeded(seed)
    for name, w in _weights(gm):
        set_tensor(gm, name, w.detach() * (1 + size * torch.randn(w.shape, generator=g)))
    for name, value in list(gm.named_parameters()) + list(gm.named_buffers()):
        if value.dim() == 1 and value.is_floating_point() and (name.endswith("bias") or "running_" in name):
            shift = size * torch.randn(value.shape, generator=g)
            set_tensor(gm, name, (value.detach().abs() + 1e-3 if "running_var" in name else value.detach()) + shift)


def assert_sound(result: dict, dense_gm, sparse_gm, batches, output: int = 0):
    """The invariant, sample by sample: bound >= observed change; certified => same prediction."""
    summary = result["summary"]
    assert summary["certifiable"], summary["not_certifiable"]
    assert summary["self_check"]["violations"] == 0, summary["self_check"]
    assert summary["self_check"]["box_violations"] == 0, summary["self_check"]
    with torch.no_grad():
        dense = torch.cat([flat_outputs(dense_gm(b))[output] for b in batches]).double()
        sparse = torch.cat([flat_outputs(sparse_gm(b))[output] for b in batches]).double()
    samples = result["samples"]
    actual = (sparse - dense).reshape(len(dense), -1).norm(dim=1)
    bound = torch.tensor(samples["bound"], dtype=torch.float64)
    assert len(bound) == len(dense) == summary["samples"]
    slack = 1e-5 * (1 + dense.abs().reshape(len(dense), -1).amax(1))
    assert bool((actual <= bound * (1 + 1e-5) + slack).all()), float((actual - bound).max())
    if "certified" in samples:
        certified = torch.tensor(samples["certified"])
        unchanged = dense.argmax(1) == sparse.argmax(1)
        assert bool(unchanged[certified].all()), "a certified sample changed its prediction"
        assert summary["certified_but_changed"] == 0
        return certified, unchanged
    return None, None


FAMILIES = ["batchnorm-unfolded", "batchnorm-decomposed", "batchnorm-folded", "depthwise-grouped", "activations",
            "pooling", "concat", "reshape", "two-outputs"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_op_family_is_certified_soundly(family):
    dense, shape = _export(family)
    batches = _inputs(shape)
    certified_mild = 0.0
    # random 2:4 masks (large changes, predictions flip), a medium nudge (some certified, some flipped near
    # the boundary), a small one (most certified)
    for variant, seed in (("2:4", 0), ("2:4", 1), ("medium", 2), ("mild", 3)):
        sparse = copy.deepcopy(dense)
        if variant == "2:4":
            _random_masks(sparse, seed)
        else:
            _mild(sparse, seed, size=0.05 if variant == "medium" else 1e-3)
        result = certify(dense, sparse, find_layers(dense, min_weights=0), batches, per_sample=True)
        summary = result["summary"]
        assert summary["not_certifiable"] == [] and "unmodelled_ops" not in summary, summary
        assert summary["unbounded_samples"] == 0
        output = summary["output"]
        assert_sound(result, dense, sparse, batches, output)
        json.dumps(result)
        if variant == "mild":
            certified_mild = summary["certified_fraction"]
    assert certified_mild > 0.0  # the bound is not vacuous on a small change


def test_two_outputs_each_output_can_be_certified():
    dense, shape = _export("two-outputs")
    batches = _inputs(shape, samples=64)
    sparse = copy.deepcopy(dense)
    _mild(sparse, 5)
    default = certify(dense, sparse, None, batches, per_sample=True)
    assert default["summary"]["output"] == 0  # the first 2-D output with several columns
    for output in (0, 1):
        result = certify(dense, sparse, None, batches, per_sample=True, output=output)
        assert result["summary"]["output"] == output
        assert_sound(result, dense, sparse, batches, output)


class BakedBatch(nn.Module):
    """Exported with a static batch: the flatten becomes view(x, [8, 128]) with the 8 written in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(128, 6)

    def forward(self, x):
        y = F.hardswish(self.conv(x))
        return self.fc(y.reshape(x.shape[0], -1))


def test_a_batch_baked_into_the_graph_is_run_at_that_batch():
    """The page-orientation crash ("shape '[8, 1280]' is invalid for input of size 81920"): a graph
    exported at batch 8 is certified on batches of another size, including a ragged last one."""
    torch.manual_seed(0)
    dense = export_graph(BakedBatch().eval(), torch.randn(8, 4, 8, 8))
    assert static_batch_size(dense) == 8
    assert any(8 in (n.args[1] if len(n.args) > 1 and isinstance(n.args[1], (list, tuple)) else ())
               for n in dense.graph.nodes if n.op == "call_function")
    sparse = copy.deepcopy(dense)
    _mild(sparse, 1)
    batches = _inputs((4, 8, 8), samples=100, batch=64)  # 64 + 36: neither a multiple of 8
    result = certify(dense, sparse, None, batches, per_sample=True)
    assert result["summary"]["samples"] == 100
    eights = [torch.cat(batches)[i:i + 8] for i in range(0, 96, 8)]
    assert_sound(_head(result, 96), dense, sparse, eights)
    limited = certify(dense, sparse, None, batches, max_samples=20)
    assert limited["summary"]["samples"] == 20 and limited["summary"]["certifiable"]


def _head(result: dict, count: int) -> dict:
    """The result restricted to its first ``count`` samples (to compare with full batches only)."""
    out = copy.deepcopy(result)
    out["summary"]["samples"] = count
    out["samples"] = {k: v[:count] for k, v in result["samples"].items()}
    return out


def test_dynamic_batch_graph_has_no_static_size():
    dense, _ = _export("concat")
    assert static_batch_size(dense) is None


class Unmodelled(nn.Module):
    """exp has no bound rule (no global Lipschitz constant); it sits after the first layer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.exp(-self.fc1(x).abs()))))


def test_an_op_without_a_rule_is_named_and_bounded_soundly():
    torch.manual_seed(0)
    dense = export_graph(Unmodelled().eval(), torch.randn(2, 8), dynamic_batch=True)
    batches = [torch.randn(32, 8, generator=seeded(1))]

    # a change before the op: everything after it is unbounded, nothing is certified, nothing crashes
    before = copy.deepcopy(dense)
    set_tensor(before, "fc1.weight", get_tensor(before, "fc1.weight") * 0.99)
    result = certify(dense, before, None, batches, per_sample=True)
    summary = result["summary"]
    assert summary["certifiable"] and summary["not_certifiable"] == []
    assert len(summary["unmodelled_ops"]) == 1 and "aten.exp" in summary["unmodelled_ops"][0]
    assert summary["unbounded_samples"] == 32 and summary["certified_fraction"] == 0.0
    assert_sound(result, dense, before, batches)
    json.dumps(result)

    # changes only after the op: the op's input is the same in both models, the bound stays finite and tight
    after = copy.deepcopy(dense)
    set_tensor(after, "fc3.weight", get_tensor(after, "fc3.weight") * 0.999)
    result = certify(dense, after, None, batches, per_sample=True)
    summary = result["summary"]
    assert "aten.exp" in summary["unmodelled_ops"][0] and summary["unbounded_samples"] == 0
    certified, _ = assert_sound(result, dense, after, batches)
    assert summary["certified_fraction"] > 0.5
    bound, actual = torch.tensor(result["samples"]["bound"]), torch.tensor(result["samples"]["actual_change"])
    assert torch.allclose(bound, actual, rtol=1e-5)  # the last layer's local term is exact


def test_an_op_that_fails_is_reported_not_raised():
    """Whatever goes wrong inside the certifier on a node is a named 'not certifiable' reason."""
    torch.manual_seed(0)
    dense = export_graph(TwoOutputs().eval(), torch.randn(2, 4, 8, 8), dynamic_batch=True)
    sparse = copy.deepcopy(dense)
    _mild(sparse, 0)
    relu = next(n for n in sparse.graph.nodes if n.op == "call_function" and "relu" in str(n.target))

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    # same (unknown) target in both graphs, so it reaches the runner, which must not raise
    for gm in (dense, sparse):
        node = next(n for n in gm.graph.nodes if n.name == relu.name)
        node.target = broken
        gm.recompile()
    result = certify(dense, sparse, None, _inputs((4, 8, 8), samples=16))
    summary = result["summary"]
    assert summary["certifiable"] is False
    assert any(relu.name in r and "boom" in r for r in summary["not_certifiable"]), summary["not_certifiable"]
