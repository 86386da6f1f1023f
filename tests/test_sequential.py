"""LockstepRunner: chunks stream through a node, the reference stream runs only when asked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import export_graph
from sparsecompile.sequential import LockstepRunner, snapshot


def _chain(depth: int = 6) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def _chunks(count: int) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, generator=generator),) for _ in range(count)]


def test_a_chain_holds_one_list_of_chunks_plus_one_per_stream():
    model = _chain()
    gm = export_graph(model, torch.randn(4, 8), dynamic_batch=True)
    for count in (1, 3, 9):
        chunks = _chunks(count)
        runner = LockstepRunner(gm, snapshot(gm))
        reference, working = runner.run(chunks, set())
        # Two streams, each: every chunk of the current input, plus the one output chunk being made.
        # (Holding both a node's inputs and outputs in full, as before, was 2 * count per stream.)
        assert runner.peak_live_chunks <= 2 * (count + 1)
        for (x,), ref, work in zip(chunks, reference, working):
            torch.testing.assert_close(ref[0], model(x))
            torch.testing.assert_close(work[0], model(x))
        single = LockstepRunner(gm, snapshot(gm))
        none, working = single.run(chunks, set(), reference=False)
        assert none == [] and single.peak_live_chunks <= count + 1
        for (x,), work in zip(chunks, working):
            torch.testing.assert_close(work[0], model(x))
        assert runner.live_chunks == 0 and single.live_chunks == 0  # graph outputs are copies, nothing held


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


def test_a_residual_branch_keeps_its_input_until_the_add():
    model = Residual().eval()
    gm = export_graph(model, torch.randn(4, 8), dynamic_batch=True)
    chunks = _chunks(5)
    runner = LockstepRunner(gm, snapshot(gm))
    _, working = runner.run(chunks, set(), reference=False)
    # x lives until the add: the frontier is two values wide, so 2 * 5 chunks (+1 being made).
    assert runner.peak_live_chunks <= 2 * 5 + 1
    for (x,), work in zip(chunks, working):
        torch.testing.assert_close(work[0], model(x))


def test_hooks_see_all_chunks_of_the_input_and_without_reference_an_empty_one():
    model = _chain(2)
    gm = export_graph(model, torch.randn(4, 8), dynamic_batch=True)
    chunks = _chunks(3)
    linear = next(n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
    seen = {}

    def before(node, reference_env, working_env):
        seen["inputs"] = [v.clone() for v in working_env[node.args[0]]]
        seen["reference_env"] = dict(reference_env)

    def after(node, reference, working):
        seen["reference"], seen["working"] = reference, len(working)
        return [w * 0 for w in working]

    _, working = LockstepRunner(gm, snapshot(gm)).run(chunks, {linear.name}, before, after, reference=False,
                                                      outputs=True)
    assert len(seen["inputs"]) == 3 and all(torch.equal(v, c[0]) for v, c in zip(seen["inputs"], chunks))
    assert seen["reference_env"] == {} and seen["reference"] == [] and seen["working"] == 3
    assert (reference_and_working := LockstepRunner(gm, snapshot(gm)).run(chunks, set(), outputs=False)) == ([], [])
    del reference_and_working


class ConvChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(y.mean((2, 3)))


def test_layer_errors_measured_in_the_lockstep_run_equal_verify_s():
    import copy

    from sparsecompile.layers import find_layers
    from sparsecompile.masks import get_method
    from sparsecompile.sparsify import sparsify
    from sparsecompile.verify import layer_output_errors

    torch.manual_seed(3)
    model = ConvChain().eval()
    calib = torch.randn(12, 8, 8, 8) * 1.3 + 0.2
    gm = export_graph(model, calib[:4], dynamic_batch=True)
    chunks = [(calib[:5],), (calib[5:],)]
    for correct in ("bias", "bn"):
        work, dense = copy.deepcopy(gm), copy.deepcopy(gm)
        layers = find_layers(work)
        eligible = [layer for layer in layers if layer.reason is None]
        outcome = sparsify(work, eligible, layers, get_method("magnitude"), chunks, correct=correct, layer_errors=True)
        expected = layer_output_errors(dense, layers, outcome.masks, chunks)
        assert set(outcome.layer_errors) == set(expected) == {layer.name for layer in eligible}
        for name, error in expected.items():
            assert outcome.layer_errors[name] == pytest.approx(error, rel=1e-6), name
    # No reference stream (sequential statistics, no correction): nothing measured, verify measures itself.
    work = copy.deepcopy(gm)
    layers = find_layers(work)
    outcome = sparsify(work, [l for l in layers if l.reason is None], layers, get_method("activation"), chunks,
                       layer_errors=True)
    assert outcome.layer_errors is None


def test_reference_outputs_of_the_lockstep_run_are_the_dense_model_s_outputs_exactly():
    import copy

    from sparsecompile.layers import find_layers
    from sparsecompile.masks import get_method
    from sparsecompile.sparsify import sparsify
    from sparsecompile.verify import run_batches

    torch.manual_seed(4)
    model = ConvChain().eval()
    calib = torch.randn(12, 8, 8, 8)
    gm = export_graph(model, calib[:4], dynamic_batch=True)
    chunks = [(calib[:5],), (calib[5:],)]
    dense = copy.deepcopy(gm)
    layers = find_layers(gm)
    outcome = sparsify(gm, [l for l in layers if l.reason is None], layers, get_method("magnitude"), chunks,
                       correct="bias", reference_outputs=True)
    expected = run_batches(dense, chunks)
    assert len(outcome.reference_outputs) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(outcome.reference_outputs, expected))  # bit for bit
    no_reference = sparsify(copy.deepcopy(dense), [l for l in layers if l.reason is None], layers,
                            get_method("magnitude"), chunks, reference_outputs=True)  # no correction: no stream
    assert no_reference.reference_outputs is None
