"""Run an FX GraphModule (or any nn.Module) with PyTorch on the CPU."""

from __future__ import annotations

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
        self.module.eval()
        return self

    @torch.no_grad()
    def infer(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        outputs = self.module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))
        return [t.detach().numpy() for t in flat_outputs(outputs)]
