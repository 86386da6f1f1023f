"""A pass manager: run named passes in order, lint after each.

A pass is a callable object with a ``name`` that takes
``(graph_module, context)`` and returns :class:`PassResult`. After every
pass the manager lints the graph and recompiles it, so a pass that leaves a
broken graph is caught at once and named in the error
(``pass 'fold_batchnorm' failed: ...``).
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
    stats: dict[str, Any] = field(default_factory=dict)


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
                PassRecord(graph_pass.name, result.modified, time.perf_counter() - start, result.stats)
            )
        return gm
