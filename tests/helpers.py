"""Shared helpers for the pass, layer, mask and verify tests.

Every pass test checks numerical equivalence through :func:`assert_same_function`
against the *original eager module*, and runs passes through :func:`run_pass`
so the pass manager lints and recompiles the graph exactly as a build does.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx

from sparsecompile.passes import PassContext, PassManager
from sparsecompile.verify import flat_outputs

aten = torch.ops.aten


def export_graph(module: torch.nn.Module, *inputs: torch.Tensor, decompose: bool = False,
                 dynamic_batch: bool = False) -> torch.fx.GraphModule:
    """The ATen-level GraphModule ``torch.export`` gives for ``module`` (build it in eval mode first).

    ``decompose=True`` runs the default decompositions (``convolution``,
    ``_native_batch_norm_legit_no_training``, ``addmm(b, x, permute(W))`` ...).
    ``dynamic_batch=True`` exports dim 0 of every input as one symbolic batch.
    """
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    with torch.no_grad():
        program = torch.export.export(module, tuple(inputs), dynamic_shapes=dynamic_shapes)
    if decompose:
        program = program.run_decompositions()
    return program.module()


def _matches(node: torch.fx.Node, ops) -> bool:
    if node.op != "call_function":
        return False
    if isinstance(ops, (set, frozenset, list, tuple)):
        return node.target in ops
    if isinstance(ops, torch._ops.OpOverloadPacket):  # aten.conv2d matches every overload
        return getattr(node.target, "overloadpacket", None) is ops
    return node.target == ops


def count_ops(gm: torch.fx.GraphModule, ops) -> int:
    """Number of ``call_function`` nodes calling ``ops`` (an overload, a packet, or a collection)."""
    return sum(1 for node in gm.graph.nodes if _matches(node, ops))


def find_nodes(gm: torch.fx.GraphModule, ops) -> list[torch.fx.Node]:
    return [node for node in gm.graph.nodes if _matches(node, ops)]


def run_pass(pass_obj, gm: torch.fx.GraphModule, example_inputs: Iterable[torch.Tensor] = (),
             options: dict | None = None):
    """Run one pass through :class:`PassManager` (so lint + recompile run too): ``(gm, record)``."""
    manager = PassManager([pass_obj])
    out = manager.run(gm, PassContext(example_inputs=tuple(example_inputs), options=dict(options or {})))
    assert len(manager.records) == 1
    record = manager.records[0]
    assert record.name == pass_obj.name
    return out, record


@torch.no_grad()
def assert_same_function(reference: torch.nn.Module, transformed: torch.nn.Module,
                         inputs: Iterable[torch.Tensor], rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """``transformed(*inputs)`` equals ``reference(*inputs)`` output by output, within tolerance."""
    inputs = tuple(inputs)
    expected = flat_outputs(reference(*inputs))
    actual = flat_outputs(transformed(*inputs))
    assert expected, "reference module produced no tensor outputs"
    assert len(actual) == len(expected), f"{len(actual)} outputs, expected {len(expected)}"
    for index, (got, want) in enumerate(zip(actual, expected)):
        assert got.shape == want.shape, f"output {index}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"output {index}: {m}")


def randomize_batchnorm(bn: torch.nn.modules.batchnorm._BatchNorm, generator: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so a wrong fold formula shows."""
    channels = bn.num_features
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(channels, generator=generator))
            bn.running_var.copy_(torch.rand(channels, generator=generator) * 2.0 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(channels, generator=generator))
            bn.bias.copy_(torch.randn(channels, generator=generator))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cli(*args):
    """Run the ``sparsecompile`` command line in-process (arguments stringified). An exception the command
    does not turn into a one-line error propagates into the test (a crash fails loudly, not as exit 1)."""
    from click.testing import CliRunner

    from sparsecompile.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_failure(result, *needles):
    """A user error: exit 1, exactly one ``error: ...`` line, the last one, holding every needle; no traceback,
    no 'bug'."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert "Traceback" not in result.output and "bug" not in lines[-1], result.output
    for needle in needles:
        assert needle in lines[-1], lines[-1]


class _TwoBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
        self.ha, self.hb = torch.nn.Linear(64, 10), torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.ha(torch.relu(self.a(x[:, :64]))) + self.hb(torch.relu(self.b(x[:, 64:])))


def two_branch_model(root) -> tuple:
    """Two eligible layers that need different methods.

    Branch ``a`` (as in the ``scaled_mlp`` fixture): every other input varies 1000x more and has 2x smaller weights,
    so magnitude masks drop the weights that carry the output, while activation-aware masks keep them. Branch ``b``:
    every other input is the constant 1000 with 100x smaller weights; activation-aware masks keep those (large
    |w| x ||x||) and drop the informative inputs, while magnitude masks drop the constant ones, whose loss the bias
    correction gives back exactly. So ``magnitude`` breaks ``a`` and ``activation`` breaks ``b``. Writes
    ``model.pt2`` and ``calib.npy`` under ``root`` and returns their paths.
    """
    import numpy as np

    generator = torch.Generator().manual_seed(0)
    even = torch.arange(64) % 2 == 0
    model = _TwoBranch().eval()
    with torch.no_grad():
        model.a.weight.copy_(torch.randn(64, 64, generator=generator) / 8 * torch.where(even, 0.5, 1.0))
        model.b.weight.copy_(torch.randn(64, 64, generator=generator) / 8 * torch.where(even, 0.01, 1.0))
        model.ha.weight.copy_(torch.randn(10, 64, generator=generator) / 240)
        model.hb.weight.copy_(torch.randn(10, 64, generator=generator) / 8 * 5)
        for layer in (model.a, model.b, model.ha, model.hb):
            layer.bias.zero_()
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(model, (torch.randn(4, 128),), dynamic_shapes=({0: batch},)),
                      root / "model.pt2")
    varied = torch.randn(256, 64, generator=generator) * torch.where(even, 1000.0, 1.0)
    constant = torch.where(even, torch.full((256, 64), 1000.0), torch.randn(256, 64, generator=generator))
    np.save(root / "calib.npy", torch.cat([varied, constant], 1).numpy())
    return root / "model.pt2", root / "calib.npy"
