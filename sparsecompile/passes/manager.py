"""A pass manager: run named passes in order, lint after each.

A pass is a callable object with a ``name`` that takes
``(graph_module, context)`` and returns :class:`PassResult`. After every
pass the manager lints the graph and recompiles it, so a pass that leaves a
broken graph is caught at once and named in the error
(``pass 'fold_batchnorm' failed: ...``).

What a pass produces besides the graph (the folded BatchNorm parameters, the
applied channel permutation) travels in ``PassResult.outputs``; the manager
keeps it in the pass's :class:`PassRecord`, and ``manager.outputs(name)``
hands it back, so callers read results from the run, never off pass objects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.fx

from sparsecompile.errors import SparseCompileError


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)  # JSON-able, shown in the build report
    outputs: Any = None  # what the pass produced for later stages (a typed object; None if nothing)


@dataclass
class PassContext:
    """What passes may read besides the graph: example inputs and options."""

    example_inputs: tuple[torch.Tensor, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    name: str

    def __call__(self, gm: torch.fx.GraphModule, context: PassContext) -> PassResult: ...


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    stats: dict[str, Any]
    outputs: Any = None  # the pass's PassResult.outputs


class PassManager:
    def __init__(self, passes: list[Pass], on_pass: Callable[[str], None] | None = None):
        self.passes = list(passes)
        self.on_pass = on_pass
        self.records: list[PassRecord] = []

    def run(self, gm: torch.fx.GraphModule, context: PassContext) -> torch.fx.GraphModule:
        for graph_pass in self.passes:
            if self.on_pass:
                self.on_pass(graph_pass.name)
            start = time.perf_counter()
            try:
                result = graph_pass(gm, context)
                result.graph_module.graph.lint()
                result.graph_module.recompile()
            except SparseCompileError as exc:
                raise SparseCompileError(f"pass '{graph_pass.name}' failed: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - name the failing pass, whatever broke
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise SparseCompileError(
                    f"pass '{graph_pass.name}' failed: {type(exc).__name__}: {first}"
                ) from exc
            gm = result.graph_module
            self.records.append(
                PassRecord(graph_pass.name, result.modified, time.perf_counter() - start, result.stats,
                           result.outputs)
            )
        return gm

    def outputs(self, name: str) -> Any:
        """What the last run of pass ``name`` produced besides the graph (its ``PassResult.outputs``)."""
        for record in reversed(self.records):
            if record.name == name:
                return record.outputs
        raise KeyError(f"pass '{name}' has not run in this manager")
