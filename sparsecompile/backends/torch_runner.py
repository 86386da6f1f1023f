"""Run an FX GraphModule (or any nn.Module) with PyTorch on the CPU.

``prepare`` turns the NumPy inputs into tensors, so ``timed_infer`` times the
forward pass alone (ONNX Runtime's binding of NumPy arrays is cheap; a
NumPy-to-tensor copy inside the timed region would not be).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from sparsecompile.backends.base import Runner
from sparsecompile.verify import flat_outputs


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def load(self) -> "TorchRunner":
        try:
            self.module.eval()
        except NotImplementedError:  # ExportedProgram.module() graphs are already inference graphs
            pass
        return self

    def prepare(self, inputs: Sequence[np.ndarray]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs)

    @torch.no_grad()
    def _forward(self, tensors: tuple[torch.Tensor, ...]):
        return self.module(*tensors)

    def timed_infer(self, prepared: tuple[torch.Tensor, ...]) -> float:
        start = time.perf_counter_ns()
        self._forward(prepared)
        return (time.perf_counter_ns() - start) / 1e6

    def infer(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [t.detach().numpy() for t in flat_outputs(self._forward(self.prepare(inputs)))]

    def close(self) -> None:
        self.module = None
