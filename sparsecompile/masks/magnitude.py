"""Magnitude masks: keep the N largest ``|w|`` in each group of M.

The classic one-shot 2:4 heuristic (NVIDIA ASP). Needs no data. Groups run
along the layer's reduction axis (input channels at each kernel position for
convolutions), so the result is the layout TensorRT's sparse kernels accept.
"""

from __future__ import annotations

import torch

from sparsecompile.masks.base import MaskContext, MaskMethod


class MagnitudeMask(MaskMethod):
    name = "magnitude"
    description = "keep the largest |w| in each group (no data needed)"

    def scores(self, weight: torch.Tensor, layer, context: MaskContext) -> torch.Tensor:
        return weight.detach().abs()
